"""Sample a trained latent-patch model for FID, and compute reference statistics.

    python sample.py --checkpoint RUN --num-samples 50000 --out OUT [--cfg-scale 1.3] [--fid-ref REF]
    torchrun --nproc_per_node 8 sample.py --checkpoint RUN --out OUT ...   (same images, split 8 ways)
    python sample.py fid-ref --source FOLDER_OR_SHARDS --out ref.npz [--features demo|inception]
    python sample.py fid --samples OUT --fid-ref ref.npz [--features demo|inception]

A thin entry point: the job lives in latent_patch/sampling.py, the metrics in latent_patch/fid.py.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fid-ref"]:
        from latent_patch.fid import main_ref

        main_ref(argv[1:])
    elif argv[:1] == ["fid"]:
        from latent_patch.fid import main_fid

        main_fid(argv[1:])
    else:
        from latent_patch.sampling import main as sample_main

        sample_main(argv)


if __name__ == "__main__":
    main()
