"""Train an MLP on scikit-learn's handwritten digits with RMSprop, on one
process or data-parallel over ``mx.distributed``, optionally with the
optimizer state sharded across the ranks.

    pip install '.[examples]'                         # scikit-learn, matplotlib
    python examples/digits_mlp.py                     # ours and mlx.optimizers.RMSprop
    mlx.launch -n 2 --backend ring -- python examples/digits_mlp.py          # data-parallel
    mlx.launch -n 2 --backend ring -- python examples/digits_mlp.py --shard  # + sharded state

(``mlx.launch`` runs its command as given: name the interpreter, as here, or
pass ``--python``.)

The data set (8x8 images, 1797 of them) ships inside scikit-learn: nothing is
downloaded. Each global batch is split between the ranks; each rank computes
its gradients and ``nn.average_gradients`` averages them (an ``all_sum``), so
every rank takes the same step. With ``--shard``, ``RMSprop(shard_group=...)``
keeps on each rank only the state of its 1/N of the parameters and
all-gathers the updated parameters.

Rank 0 prints the test accuracy, the median time per training step (and of
its optimizer update: ``opt.update`` and its evaluation, which with ``--shard``
includes the all-gather), the optimizer state each rank holds, and writes a loss-curve PNG. With
``--optimizer both`` (the default) the two optimizers train the same model
from the same start on the same batches: their float32 parameters come out
bit-identical, sharded or not, which the script checks and prints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import mlx_fused_rmsprop


class MLP(nn.Module):
    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


def load_data(seed: int) -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install '.[examples]' (or scikit-learn)")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = len(x) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def state_nbytes(opt: optim.Optimizer) -> int:
    """Bytes of per-parameter optimizer state on this process."""
    return sum(
        v.nbytes for k, v in tree_flatten(opt.state) if k not in ("step", "learning_rate")
    )


def train(name: str, args, group, data) -> dict:
    x_train, y_train, x_test, y_test = data
    rank, size = group.rank(), group.size()
    mx.random.seed(args.seed)
    model = MLP([64] + [args.hidden] * args.depth + [10])
    mx.eval(model.parameters())
    if name == "fused":
        opt = mlx_fused_rmsprop.RMSprop(
            args.lr, shard_group=group if args.shard else None
        )
    else:
        opt = optim.RMSprop(args.lr)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    per_rank = args.batch_size // size
    losses, times, update_times = [], [], []
    for epoch in range(args.epochs):
        order = np.random.default_rng(args.seed + 1 + epoch).permutation(len(x_train))
        for b in range(len(order) // args.batch_size):
            batch = order[b * args.batch_size : (b + 1) * args.batch_size]
            mine = batch[rank * per_rank : (rank + 1) * per_rank]  # this rank's share
            x, y = mx.array(x_train[mine]), mx.array(y_train[mine])
            start = time.perf_counter()
            loss, grads = loss_and_grad(model, x, y)
            if size > 1:
                grads = nn.average_gradients(grads, group=group)
                loss = mx.distributed.all_sum(loss, group=group) / size
            mx.eval(grads, loss)
            between = time.perf_counter()
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
            end = time.perf_counter()
            times.append(end - start)
            update_times.append(end - between)
            losses.append(loss.item())
    logits = model(mx.array(x_test))
    accuracy = mx.mean(mx.argmax(logits, axis=1) == mx.array(y_test)).item()
    mine = mx.array([state_nbytes(opt)], dtype=mx.int64)
    everyone = mx.distributed.all_gather(mine, group=group) if size > 1 else mine
    return {
        "optimizer": name,
        "accuracy": accuracy,
        "ms_per_step": 1e3 * statistics.median(times[5:] or times),
        "optimizer_ms_per_step": 1e3 * statistics.median(update_times[5:] or update_times),
        "steps": len(times),
        "state_bytes_per_rank": everyone.tolist(),
        "parameter_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
        "losses": losses,
        "parameters": dict(tree_flatten(model.parameters())),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", choices=["both", "fused", "reference"], default="both",
                   help="ours (fused), mlx.optimizers.RMSprop (reference) or both")
    p.add_argument("--fused", dest="optimizer", action="store_const", const="fused")
    p.add_argument("--reference", dest="optimizer", action="store_const", const="reference")
    p.add_argument("--shard", action="store_true",
                   help="shard the fused optimizer's state across the ranks")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=96, help="global, split between ranks")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=2, help="hidden layers")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="digits_loss.png", help="loss-curve PNG ('' for none)")
    p.add_argument("--json", default="", help="also write the results here (rank 0)")
    args = p.parse_args(argv)

    group = mx.distributed.init()
    if args.batch_size % group.size():
        p.error(f"--batch-size {args.batch_size} must be a multiple of the {group.size()} ranks")
    if args.shard and args.optimizer == "reference":
        p.error("--shard shards the fused optimizer's state: mlx.optimizers.RMSprop has no sharding")
    data = load_data(args.seed)
    names = ["fused", "reference"] if args.optimizer == "both" else [args.optimizer]
    results = [train(name, args, group, data) for name in names]

    if group.rank() != 0:
        return
    mode = f"{group.size()} rank(s), {'sharded' if args.shard else 'replicated'} fused state"
    print(f"digits MLP {[64] + [args.hidden] * args.depth + [10]}, {mode}, "
          f"{results[0]['steps']} steps of {args.batch_size} images")
    for r in results:
        label = "mlx_fused_rmsprop.RMSprop" if r["optimizer"] == "fused" else "mlx.optimizers.RMSprop"
        print(f"  {label:26s} test accuracy {100 * r['accuracy']:.2f}%  "
              f"{r['ms_per_step']:.2f} ms/step (optimizer {r['optimizer_ms_per_step']:.2f})  state per rank (bytes) {r['state_bytes_per_rank']}  "
              f"final loss {r['losses'][-1]:.4f}")
    same = None
    if len(results) == 2:
        same = all(
            mx.array_equal(a, results[1]["parameters"][k]).item()
            for k, a in results[0]["parameters"].items()
        )
        print(f"  parameters bit-identical between the two: {same}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r, style in zip(results, ["-", "--"]):
            ax.plot(r["losses"], style, label=r["optimizer"])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (cross entropy)")
        ax.set_yscale("log")
        ax.set_title(f"digits MLP, RMSprop lr={args.lr}, {mode}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"  loss curve: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "ranks": group.size(), "shard": args.shard, "bit_identical": same,
                    "results": [{k: v for k, v in r.items() if k != "parameters"} for r in results],
                },
                f,
            )


if __name__ == "__main__":
    main()
