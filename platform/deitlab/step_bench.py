"""`python -m deitlab.step_bench`: the step benchmark with torch + timm only (bare GPU boxes); deitlab.bench.step."""
from deitlab.bench.step import main

if __name__ == "__main__":
    raise SystemExit(main())
