"""Sample a trained latent-patch model for FID, and compute reference statistics.

    python sample.py --checkpoint RUN --num-samples 50000 --out OUT [--cfg-scale 1.3] [--fid-ref REF]
    torchrun --nproc_per_node 8 sample.py --checkpoint RUN --out OUT ...   (same images, split 8 ways)
    python sample.py fid-ref --source FOLDER_OR_SHARDS --out ref.npz [--features demo|inception]
    python sample.py fid --samples OUT --fid-ref ref.npz [--features demo|inception]
    python sample.py export --checkpoint RUN --out DIR    (a diffusers LatentPatchPipeline folder)

A thin entry point: the job and the commands live in latent_patch/sampling.py, the metrics in
latent_patch/fid.py.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch, turning the jobs' refusals into one clear line and exit status 1 (no traceback)."""
    from latent_patch.checkpoint import CheckpointError
    from latent_patch.sampling import SettingsMismatch

    try:
        _dispatch(list(sys.argv[1:] if argv is None else argv))
    except (CheckpointError, SettingsMismatch, FileNotFoundError, ValueError) as err:
        print(f"sample.py: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _dispatch(argv: list[str]) -> None:
    if argv[:1] == ["fid-ref"]:
        from latent_patch.sampling import main_ref

        main_ref(argv[1:])
    elif argv[:1] == ["fid"]:
        from latent_patch.sampling import main_fid

        main_fid(argv[1:])
    elif argv[:1] == ["export"]:
        from latent_patch.pipeline import main_export

        main_export(argv[1:])
    else:
        from latent_patch.sampling import main as sample_main

        sample_main(argv)


if __name__ == "__main__":
    main()
