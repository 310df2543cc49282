"""Representation targets: a frozen image encoder's patch-token grids, computed once at encoding.

REPA aligns a DiT block's tokens to a frozen encoder's patch tokens. REPA runs the encoder on raw
images every training step; here it runs once, on the same [-1, 1] pixels the VAE encodes, and its
grid is stored beside the latent. A PCA (:func:`fit_pca`) can shrink the token dimension; its
parameters travel in the manifest as plain lists (:func:`pca_to_json`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Iterable

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .codec import parse_dtype
from .dist import autocast
from .seeds import derive_seed

CONFIG_KEYS = ("architecture", "model_args", "image_size", "mean", "std")
DEMO_REPR_DIR = Path(__file__).resolve().parent / "assets" / "demo_repr"
"""The demo's encoder (``--repr demo``): trained without labels on the demo's training images only
(``tools/train_demo_repr.py``), a stand-in for DINOv2 as the demo VAE is for the SD-VAE."""


def save_folder(model: torch.nn.Module, folder: str | Path, model_args: dict, image_size: int,
                mean: Iterable[float], std: Iterable[float], source: str = "") -> Path:
    """Write ``model`` (built with ``num_classes=0``) as a folder :meth:`ReprEncoder.load` reads:
    ``config.json`` (the timm architecture, the kwargs that rebuild it, input size, normalisation)
    and ``model.safetensors``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architecture": model.pretrained_cfg["architecture"], "model_args": dict(model_args),
              "image_size": int(image_size), "mean": [float(v) for v in mean],
              "std": [float(v) for v in std], "source": source}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _is_rgb(v: object) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)


def _read_config(path: Path) -> dict:
    """config.json, each field checked: an error names the file and the field."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from err
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(missing)}")
    checks = {"architecture": (lambda v: isinstance(v, str) and timm.is_model(v), "a timm architecture name"),
              "model_args": (lambda v: isinstance(v, dict), "an object of timm kwargs"),
              "image_size": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
              "mean": (_is_rgb, "3 numbers (R, G, B)"),
              "std": (lambda v: _is_rgb(v) and min(v) > 0, "3 positive numbers")}
    for key, (ok, what) in checks.items():
        if not ok(cfg[key]):
            raise ValueError(f"{path}: field '{key}' must be {what}, got {cfg[key]!r}")
    return cfg


def _from_folder(folder: Path, image_size: int | None) -> tuple[torch.nn.Module, dict]:
    cfg = _read_config(folder / "config.json")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (the encoder's weights; see represent.save_folder)")
    if image_size not in (None, cfg["image_size"]):
        raise ValueError(f"{folder}/config.json: image_size is {cfg['image_size']}, not the {image_size} asked for")
    try:
        model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0, **cfg["model_args"])
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"{folder}/config.json: field 'model_args' does not build "
                         f"{cfg['architecture']}: {err}") from err
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, OSError) as err:
        first = [ln.strip() for ln in str(err).splitlines() if ln.strip()][:2]
        raise ValueError(f"{weights}: does not fit config.json's architecture/model_args "
                         f"({' '.join(first)})") from err
    return model, cfg


def _from_hub(spec: str, image_size: int | None) -> tuple[torch.nn.Module, dict]:
    """A pretrained timm model. Normalisation comes from its ``pretrained_cfg`` (``mean``, ``std``,
    via ``timm.data.resolve_data_config``); the input size is the model's own
    ``patch_embed.img_size``: ``pretrained_cfg['input_size']`` unless ``image_size`` rebuilt it
    (timm then resamples the position embedding, e.g. DINOv2's 518 px -> REPA's 224 px)."""
    extra = {} if image_size is None else {"img_size": image_size}
    try:
        model = timm.create_model(spec, pretrained=True, num_classes=0, **extra)
    except Exception as err:  # the hub's errors vary by version: requests, OSError, EntryNotFound
        reason = (str(err).splitlines() or [""])[0]
        raise RuntimeError(f"cannot fetch the timm encoder '{spec}' ({type(err).__name__}: {reason}); "
                           "without hub access pass a local folder (config.json + model.safetensors, "
                           "see represent.save_folder)") from err
    data = timm.data.resolve_data_config({}, model=model)
    cfg = {"architecture": model.pretrained_cfg.get("architecture", spec.split(".")[0]),
           "image_size": int(model.patch_embed.img_size[0]), "mean": list(data["mean"]),
           "std": list(data["std"]), "source": f"timm:{spec}"}
    return model, cfg


def _final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm ``forward_features`` left out. timm's VisionTransformer (read in timm 1.0.31) ends
    ``forward_features`` with ``self.norm`` (so its tokens are DINOv2's ``x_norm_patchtokens``,
    which REPA aligns to), except for
    avg-pool models, where that norm is ``fc_norm`` applied after pooling: applied per token here."""
    fc_norm = getattr(model, "fc_norm", None)
    if isinstance(getattr(model, "norm", None), torch.nn.Identity) and fc_norm is not None \
            and not isinstance(fc_norm, torch.nn.Identity):
        return fc_norm
    return None


class ReprEncoder:
    """A frozen timm ViT: pixels in [-1, 1] -> its normed patch tokens as a (B, gh, gw, D) fp16 grid."""

    def __init__(self, model: torch.nn.Module, name: str, cfg: dict, device: torch.device,
                 dtype: torch.dtype) -> None:
        if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
            raise ValueError(f"{name}: not a ViT-style timm model (no patch_embed / num_prefix_tokens)")
        self.model = model.eval().requires_grad_(False).to(device)
        self.name, self.device, self.dtype = name, device, dtype
        self.architecture, self.source = cfg["architecture"], cfg.get("source", "")
        self.image_size = int(cfg["image_size"])
        built = tuple(model.patch_embed.img_size)
        if built != (self.image_size, self.image_size):
            raise ValueError(f"{name}: image_size {self.image_size} but the model is built for {built}")
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)
        self.dim = int(model.num_features)
        self.mean, self.std = [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]
        self._mean, self._std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (self.mean, self.std))
        self._norm = _final_norm(model)

    @classmethod
    def load(cls, spec: str, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, image_size: int | None = None) -> "ReprEncoder":
        """Load from a local folder (see :func:`save_folder`), ``"demo"`` (:data:`DEMO_REPR_DIR`) or
        a timm model id (pretrained from the hub; ``image_size`` rebuilds it for another input
        size); all then share the rest."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if spec == "demo":
            if not (DEMO_REPR_DIR / "config.json").is_file():
                raise FileNotFoundError(f"the demo encoder is not built yet ({DEMO_REPR_DIR} has no "
                                        "config.json): run `python tools/train_demo_repr.py` first")
        path = DEMO_REPR_DIR if spec == "demo" else Path(spec).expanduser()
        if path.is_dir():
            model, cfg = _from_folder(path, image_size)
            name = "demo" if spec == "demo" else str(path.resolve())
        elif timm.is_model(spec):
            model, cfg = _from_hub(spec, image_size)
            name = spec
        else:
            raise FileNotFoundError(f"encoder {spec!r}: no such folder and not a timm model id")
        return cls(model, name, cfg, device, parse_dtype(dtype, device))

    def describe(self) -> dict:
        """The manifest's entry: what the stored grids are."""
        return {"spec": self.name, "architecture": self.architecture, "image_size": self.image_size,
                "grid": list(self.grid), "dim": self.dim, "mean": self.mean, "std": self.std,
                "dtype": "float16", "source": self.source}

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels -> the encoder's input, as REPA's ``preprocess_raw_image`` for DINOv2:
        [0, 1], normalised by the encoder's mean/std, then bicubic resize to its input size."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
        x = (pixels.to(self.device, torch.float32) + 1) / 2
        x = (x - self._mean) / self._std
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic")
        return x

    def _tokens(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        with torch.inference_mode(), autocast(self.device, dtype):
            t = self.model.forward_features(x)
            t = t if self._norm is None else self._norm(t)
        return t[:, self.model.num_prefix_tokens:].float()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels NCHW in [-1, 1] -> patch tokens (B, gh, gw, D) float16 on the device; CLS and
        register tokens dropped. A reduced-precision batch that overflowed is redone in fp32."""
        with torch.inference_mode():
            x = self.preprocess(pixels)
            t = self._tokens(x, self.dtype)
            if self.dtype != torch.float32 and not torch.isfinite(t).all():
                t = self._tokens(x, torch.float32)
            grid = t.reshape(len(x), *self.grid, self.dim).half()
            if not torch.isfinite(grid).all():
                raise RuntimeError(f"encoder {self.name}: non-finite patch tokens (beyond float16's range?)")
        return grid

    def forward_flops_per_image(self) -> int:
        """Forward FLOPs of one image (2 per MAC), counted on a meta-device copy: no compute, and
        attention is counted (CPU's fused attention kernel has no FLOP formula in torch)."""
        from torch.utils.flop_counter import FlopCounterMode

        meta = copy.deepcopy(self.model).to("meta")
        x = torch.zeros(1, 3, self.image_size, self.image_size, device="meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            meta.forward_features(x)
        return int(counter.get_total_flops())


# --------------------------------------------------------------------------- PCA reduction

def fit_pca(samples: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The top-``k`` principal components of (N, D) token samples, in float64. Each component's
    largest-|value| entry is made positive, so a refit on the same samples gives the same bits."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 2 or not 1 <= k <= min(x.shape):
        raise ValueError(f"fit_pca: need (N, D) samples and 1 <= k <= min(N, D); got {x.shape}, k={k}")
    if not np.isfinite(x).all():
        raise ValueError("fit_pca: samples hold non-finite values")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    total = float((s ** 2).sum())
    if total == 0:
        raise ValueError("fit_pca: the samples have no variance")
    comps = vt[:k]
    comps = comps * np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])[:, None]
    return {"mean": mean, "components": comps, "explained_variance_ratio": s[:k] ** 2 / total}


def apply_pca(grid: torch.Tensor, pca: dict[str, np.ndarray]) -> torch.Tensor:
    """(B, gh, gw, D) grid -> (B, gh, gw, k) float16 projections onto the components (in float32)."""
    comps = torch.as_tensor(pca["components"], dtype=torch.float32, device=grid.device)
    if grid.shape[-1] != comps.shape[1]:
        raise ValueError(f"apply_pca: grid has D={grid.shape[-1]}, the PCA was fitted on D={comps.shape[1]}")
    mean = torch.as_tensor(pca["mean"], dtype=torch.float32, device=grid.device)
    return ((grid.float() - mean) @ comps.T).half()


def pca_to_json(pca: dict[str, np.ndarray]) -> dict:
    """Plain lists for the manifest (Python's float repr round-trips float64 exactly)."""
    return {key: np.asarray(pca[key], dtype=np.float64).tolist()
            for key in ("mean", "components", "explained_variance_ratio")}


def pca_from_json(obj: dict) -> dict[str, np.ndarray]:
    """The manifest's PCA entry, checked (shapes, finiteness, orthonormal rows); errors name the field."""
    out = {}
    for key, ndim in (("mean", 1), ("components", 2), ("explained_variance_ratio", 1)):
        try:
            out[key] = a = np.asarray(obj[key], dtype=np.float64)
        except KeyError:
            raise ValueError(f"pca.{key}: missing") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"pca.{key}: not a numeric array ({err})") from err
        if a.ndim != ndim or not a.size or not np.isfinite(a).all():
            raise ValueError(f"pca.{key}: expected a finite non-empty {ndim}-D array, got shape {a.shape}")
    k, d = out["components"].shape
    if out["mean"].shape != (d,) or out["explained_variance_ratio"].shape != (k,):
        raise ValueError(f"pca.mean / pca.explained_variance_ratio: shapes {out['mean'].shape} / "
                         f"{out['explained_variance_ratio'].shape} do not fit pca.components {(k, d)}")
    if not np.allclose(out["components"] @ out["components"].T, np.eye(k), atol=1e-6):
        raise ValueError("pca.components: rows are not orthonormal")
    return out


def _token_keys(seed: int, start: int, n: int) -> np.ndarray:
    """A 64-bit hash (splitmix64) of each token's position in the stream, keyed by the seed."""
    z = np.arange(start + 1, start + n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = z + np.uint64(derive_seed("repr-pca", seed))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_for_pca(grids: Iterable[torch.Tensor | np.ndarray], budget: int, seed: int) -> np.ndarray:
    """A seeded subset of at most ``budget`` tokens (rows of D, float32, in stream order) from
    (B, gh, gw, D) grids. Each token's key is a hash of (seed, its position in the stream) and the
    ``budget`` smallest keys win, so the sample does not depend on how the stream is batched."""
    if budget < 1:
        raise ValueError(f"sample_for_pca: budget must be >= 1, got {budget}")
    keys, pos, kept, seen = np.empty(0, np.uint64), np.empty(0, np.int64), None, 0
    for g in grids:
        a = g.detach().cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        tokens = a.reshape(-1, a.shape[-1]).astype(np.float32)
        keys = np.concatenate([keys, _token_keys(seed, seen, len(tokens))])
        pos = np.concatenate([pos, np.arange(seen, seen + len(tokens))])
        kept = tokens if kept is None else np.concatenate([kept, tokens])
        seen += len(tokens)
        if len(keys) > budget:
            best = np.lexsort((pos, keys))[:budget]
            keys, pos, kept = keys[best], pos[best], kept[best]
    if kept is None:
        raise ValueError("sample_for_pca: no grids")
    return kept[np.argsort(pos, kind="stable")]
