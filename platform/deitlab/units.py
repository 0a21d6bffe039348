"""Sizes as people read them (stdlib only: any layer, the CLI included, may use it)."""


def human_bytes(n: float) -> str:
    """1234567 → '1.2 MB' (powers of 1000, as disks and buckets count)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
