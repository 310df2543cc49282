"""Train the demo classifier (latent_patch/classifier.py) on the embedded Fashion-MNIST subset.

    nice -n 5 python tools/train_demo_classifier.py            # writes latent_patch/assets/demo_classifier.safetensors

Trains on the 10,000 shipped training images at 64 px RGB (the demo's preprocessing, see
tools/build_demo_data.py) with random horizontal flips and random shifts of up to 4 px, AdamW and
a one-cycle learning rate, and reports accuracy on the held-out test shards after each epoch.
The final epoch's weights are saved (no selection on the test set). Deterministic for a seed on
a given machine and thread count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_demo_data import DEFAULT_ASSETS, seeded_splits, to_float  # noqa: E402

from latent_patch.classifier import DEMO_CLASSIFIER_PATH, DemoClassifier, save_classifier  # noqa: E402


def augment(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random translation (padding with the background, -1)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if shift > 0:
        padded = F.pad(x, (shift,) * 4, value=-1.0)
        dy, dx = torch.randint(0, 2 * shift + 1, (2, b), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return x


@torch.no_grad()
def evaluate(model: DemoClassifier, pixels: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        logits = model(to_float(pixels[i:i + batch]))
        correct += (logits.argmax(1) == labels[i:i + batch]).sum().item()
    return correct / len(labels)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_ASSETS)
    p.add_argument("--out", type=Path, default=DEMO_CLASSIFIER_PATH)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--shift", type=int, default=4, help="max random shift in pixels (64 px scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    gen, (train_x, train_y), (test_x, test_y) = seeded_splits(args.data, args.seed, args.threads)

    model = DemoClassifier()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_y) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.2)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=gen)
        total_loss = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * args.batch:(s + 1) * args.batch]
            x = augment(to_float(train_x[idx]), args.shift, gen)
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item()
        acc = evaluate(model, test_x, test_y)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {total_loss / steps_per_epoch:.4f}  "
              f"held-out acc {acc:.4f}  {time.time() - start:.0f}s", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model.eval(), args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); final held-out accuracy "
          f"{acc:.4f} on {len(test_y)} images; {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
