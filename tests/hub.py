"""A Hugging Face hub cache built by a test: pretrained weights for timm models, offline.

    cache = HubCache(os.environ["HF_HOME"])           # conftest points HF_HOME at a fresh folder, offline
    sha = cache.add("test_resnet.r160_in1k", seed=0)  # random weights, saved as the hub would serve them
    timm.create_model("test_resnet.r160_in1k", pretrained=True)  # reads them from there

The layout is huggingface_hub's: hub/models--timm--NAME/snapshots/REV/model.safetensors and refs/main holding REV;
with HF_HOME pointing at it and HF_HUB_OFFLINE=1, timm's own loader reads the file from there. The weights are random
(seeded): a test can check that they were loaded (checksum, a forward pass), not that they are any good.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


class HubCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def add(self, name: str, seed: int = 0) -> str:
        """Write random weights for timm's `name` (architecture.tag) into the cache; returns the file's SHA-256."""
        import timm
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False)
        cfg = model.pretrained_cfg
        repo = cfg["hf_hub_id"]
        revision = hashlib.sha1(f"{name}-{seed}".encode()).hexdigest()
        base = self.root / "hub" / f"models--{repo.replace('/', '--')}"
        snapshot = base / "snapshots" / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        path = snapshot / "model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        # what timm reads for hf-hub:ORG/NAME names (the architecture and its pretrained config)
        pretrained = {k: v for k, v in cfg.items() if k in ("input_size", "interpolation", "crop_pct", "mean", "std",
                                                             "num_classes", "first_conv", "classifier")}
        (snapshot / "config.json").write_text(json.dumps({"architecture": cfg["architecture"],
                                                          "num_classes": model.num_classes,
                                                          "pretrained_cfg": pretrained}))
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / "main").write_text(revision)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def env(self) -> dict[str, str]:
        """For processes this cache should serve (huggingface_hub reads both when it is first imported)."""
        return {"HF_HOME": str(self.root), "HF_HUB_OFFLINE": "1"}
