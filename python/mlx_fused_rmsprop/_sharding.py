r"""Optimizer state sharded across the ranks of an ``mx.distributed`` group (ZeRO stage 1).

The layout
----------
The gradient leaves, in the order of :func:`mlx.utils.tree_flatten` over the
gradient tree, are viewed as ONE flat vector of :math:`E` elements (each leaf
flattened row-major, the leaves one after the other). With :math:`N` ranks and
:math:`S = \lceil E / N \rceil`, rank :math:`r` owns the elements

.. math::

    [\, rS,\ \min((r + 1) S, E) \,)

so every rank owns at most :math:`S` elements whatever the leaf sizes (the
last ranks may own fewer, or none when :math:`E < N`). A leaf may be split
between ranks: a rank's *piece* of a leaf is a contiguous range
``[start, stop)`` of that leaf's flattened elements. A leaf with no elements
gets an empty piece on rank 0, so every leaf has at least one piece.

The step
--------
Each rank updates only its pieces, with the same fused primitive as the
unsharded optimizer applied to 1-D slices (``param.reshape(-1)[start:stop]``,
and the state piece of shape ``(stop - start,)``). The update is element-wise,
so the result is bit-identical to the whole-leaf update. The updated pieces are
then all-gathered in *buckets*: per parameter dtype (``all_gather`` moves one
dtype), each rank's pieces of that dtype concatenated in leaf order form its
local vector :math:`L_r`; bucket :math:`k` carries elements
``[k B, (k + 1) B)`` of every :math:`L_r` (:math:`B` = ``bucket_bytes`` over
the item size), padded to the same width on every rank. Concatenating the
ranks' :math:`L_r` in rank order gives back the dtype's leaves in order, since
ownership ranges are contiguous and increasing. A step thus runs
``sum over dtypes of ceil(max_r |L_r| / B)`` gathers (usually one per dtype),
plus one gather of 17 bytes per rank that makes the ranks agree to proceed (see
:func:`agree`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_map, tree_unflatten

from . import _ext
from . import _guards
from . import _options
from . import _state
from ._state import SCALAR_ENTRIES

# Keys of the per-rank checkpoint (RMSprop.sharded_state_dict) that are not
# state entries.
SHARD_KEY = "__shard__"
PIECE_SUFFIX = "." + SHARD_KEY

# The agreement: a digest of what must agree, then (on failure) messages.
_FINGERPRINT = 16
_MESSAGE = 1024


class ShardedStepError(ValueError):
    """A sharded step failed on at least one rank; raised on EVERY rank.

    Raised with the same message on every rank of the group, before any
    parameter, state entry, learning rate or step counter changed, so that no
    rank waits forever in a collective the failing one never reaches.

    Attributes:
        rank_errors (dict[int, str]): The error each failing rank saw, by rank.
    """

    def __init__(self, message: str, rank_errors: dict[int, str]):
        super().__init__(message)
        self.rank_errors = rank_errors


@dataclass(frozen=True)
class Leaf:
    """One gradient leaf in the flat layout."""

    keys: tuple  # the keys from the tree's root to the leaf
    path: str  # the keys joined by "." (as tree_flatten names it)
    shape: tuple[int, ...]
    dtype: mx.Dtype
    offset: int  # first element in the flat vector of all leaves
    size: int


@dataclass(frozen=True)
class Piece:
    """The elements ``[start, stop)`` of leaf ``leaf``'s flattened elements,
    owned by ``rank``; ``local`` is where they start in that rank's vector of
    its pieces of the leaf's dtype."""

    leaf: int
    rank: int
    start: int
    stop: int
    local: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class Bucket:
    """Gather ``k`` of a dtype: local elements ``[lo, lo + width)`` of every rank."""

    dtype: mx.Dtype
    lo: int
    width: int


@dataclass
class ShardPlan:
    """The layout of a sharded step: which rank owns which pieces, and the buckets.

    Built from the gradient tree only, so every rank computes the same plan.
    """

    leaves: list[Leaf]
    ranks: int
    rank: int
    bucket_bytes: int
    pieces: list[Piece] = field(default_factory=list)  # every rank's, in leaf order
    buckets: list[Bucket] = field(default_factory=list)
    local_sizes: dict[str, list[int]] = field(default_factory=dict)  # dtype -> per rank

    @property
    def total(self) -> int:
        """E, the number of elements of all leaves."""
        return sum(leaf.size for leaf in self.leaves)

    @property
    def share(self) -> int:
        r"""S = ceil(E / N), the most elements a rank owns."""
        return -(-self.total // self.ranks)

    def own_pieces(self) -> list[Piece]:
        """This rank's pieces, in leaf order."""
        return [p for p in self.pieces if p.rank == self.rank]

    def signature(self) -> tuple:
        """What must agree between ranks (and between a state and the gradients)."""
        return tuple((leaf.path, leaf.shape, str(leaf.dtype)) for leaf in self.leaves)


def flatten(tree: Any, keys: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Yield (keys, leaf) in the order of mlx.utils.tree_flatten: dicts in
    insertion order, lists and tuples by index; anything else is a leaf."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flatten(v, keys + (k,))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from flatten(v, keys + (i,))
    else:
        yield keys, tree


def make_plan(
    gradients: Any,
    ranks: int,
    rank: int,
    bucket_bytes: int,
    quantizes: Optional[Any] = None,
) -> ShardPlan:
    """The plan for a gradient tree whose leaves are all arrays (checked
    before). ``quantizes(size, dtype)`` tells which leaves keep 8-bit state:
    their pieces start and stop at multiples of the block (256 elements of
    the leaf), so a block and its scale never span ranks."""
    leaves = []
    offset = 0
    for keys, g in flatten(gradients):
        size = int(g.size)
        path = ".".join(str(k) for k in keys)
        leaves.append(Leaf(keys, path, tuple(g.shape), g.dtype, offset, size))
        offset += size
    plan = ShardPlan(leaves, ranks, rank, bucket_bytes)
    share = plan.share
    local: dict[str, list[int]] = {}
    dtypes: dict[str, mx.Dtype] = {}
    for i, leaf in enumerate(leaves):
        key = str(leaf.dtype)
        dtypes.setdefault(key, leaf.dtype)
        sizes = local.setdefault(key, [0] * ranks)
        if leaf.size == 0:
            owners = [(0, 0, 0)]
        else:
            first = leaf.offset // share
            last = (leaf.offset + leaf.size - 1) // share
            owners = [
                (
                    r,
                    max(leaf.offset, r * share) - leaf.offset,
                    min(leaf.offset + leaf.size, (r + 1) * share) - leaf.offset,
                )
                for r in range(first, last + 1)
            ]
            if quantizes is not None and quantizes(leaf.size, leaf.dtype):
                # Every split point moves up to the next block boundary (the
                # same function for a piece's stop and the next one's start,
                # so the pieces still tile the leaf); empty pieces go.
                def up(x: int, size: int = leaf.size) -> int:
                    return min(size, -(-x // _state.BLOCK) * _state.BLOCK)

                owners = [(r, up(a), up(b)) for r, a, b in owners if up(a) < up(b)]
        for r, start, stop in owners:
            plan.pieces.append(Piece(i, r, start, stop, sizes[r]))
            sizes[r] += stop - start
    plan.local_sizes = local
    for key, sizes in local.items():
        dtype = dtypes[key]
        width = max(1, bucket_bytes // dtype.size)
        longest = max(sizes)
        for lo in range(0, longest, width):
            plan.buckets.append(Bucket(dtype, lo, min(width, longest - lo)))
    return plan


def gather_parameters(
    plan: ShardPlan,
    updated: dict[int, mx.array],
    parameters: list[mx.array],
    group: mx.distributed.Group,
) -> list[mx.array]:
    """All-gather the updated pieces bucket by bucket and return every leaf.

    ``updated`` maps the index (in ``plan.pieces``) of each of this rank's
    non-empty pieces to its updated 1-D elements; ``parameters`` are the
    leaves before the step (a leaf without elements is returned as it was).
    """
    own = [(i, p) for i, p in enumerate(plan.pieces) if p.rank == plan.rank]
    gathered: list[tuple[Bucket, mx.array]] = []
    for bucket in plan.buckets:
        hi = bucket.lo + bucket.width
        parts = []
        filled = 0
        for i, p in own:
            if plan.leaves[p.leaf].dtype != bucket.dtype or p.size == 0:
                continue
            a, b = max(p.local, bucket.lo), min(p.local + p.size, hi)
            if a < b:
                parts.append(updated[i][a - p.local : b - p.local])
                filled += b - a
        if filled < bucket.width:
            parts.append(mx.zeros((bucket.width - filled,), bucket.dtype))
        send = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        received = mx.distributed.all_gather(send, group=group)
        # One at a time: what a send depends on differs between ranks (their
        # own pieces, or only padding), so in one lazy graph the ranks could
        # reach the collectives in different orders and deadlock.
        mx.eval(received)
        gathered.append((bucket, received))

    out: list[list[mx.array]] = [[] for _ in plan.leaves]
    for p in plan.pieces:  # in leaf order, and by rank within a leaf
        if p.size == 0:
            continue
        for bucket, g in gathered:
            if bucket.dtype != plan.leaves[p.leaf].dtype:
                continue
            a, b = max(p.local, bucket.lo), min(p.local + p.size, bucket.lo + bucket.width)
            if a < b:
                base = p.rank * bucket.width - bucket.lo
                out[p.leaf].append(g[base + a : base + b])
    leaves = []
    for leaf, parts, param in zip(plan.leaves, out, parameters):
        if not parts:
            leaves.append(param)
            continue
        flat = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        leaves.append(flat.reshape(leaf.shape))
    return leaves


def fingerprint(*items: Any) -> bytes:
    """A digest of what every rank must agree on (reprs of plain values)."""
    return hashlib.blake2b(repr(items).encode(), digest_size=_FINGERPRINT).digest()


def leaves_digest(plan: ShardPlan) -> list[int]:
    """The digest of the plan's leaves (paths, shapes, dtypes) as two int64:
    the same on every rank of one model, so that a checkpoint's pieces from
    two models are told apart even where their element counts agree."""
    digest = fingerprint(plan.signature())
    return [int.from_bytes(digest[i : i + 8], "little", signed=True) for i in (0, 8)]


def _gather_bytes(data: bytes, group: mx.distributed.Group) -> list[bytes]:
    """Every rank's ``data`` (all of the same length), by rank."""
    everyone = bytes(mx.distributed.all_gather(mx.array(list(data), dtype=mx.uint8), group=group).tolist())
    return [everyone[i : i + len(data)] for i in range(0, len(everyone), len(data))]


def agree(
    group: mx.distributed.Group,
    error: Optional[BaseException],
    digest: bytes,
    skip: bool = False,
    gradients_digest: bytes = b"",
) -> bool:
    """Make every rank of ``group`` agree whether a step may proceed; returns
    whether it is skipped (a non-finite gradient on any rank).

    Each rank contributes a small record -- a failure flag, a skip flag, the
    digest of what must agree (the gradient leaves, options, step, learning
    rate) and one of its gradients' global norm (with the guards) -- to one
    ``all_gather`` of a few bytes. When any failure flag is set, every rank
    (knowing it from the same records) takes part in a second gather of the
    error messages, so every rank raises the same :class:`ShardedStepError`;
    when the digests differ, likewise; when any rank skips, every rank
    skips; when the norms differ (the ranks were not given the same, e.g.
    averaged, gradients), every rank raises. Otherwise all proceed: the
    healthy step pays one tiny collective. Call it after every check that
    can differ between ranks and before any other collective.
    """
    digest = digest[:_FINGERPRINT].ljust(_FINGERPRINT, b"\0")  # none when a check failed
    gradients_digest = gradients_digest[:_FINGERPRINT].ljust(_FINGERPRINT, b"\0")
    flags = bytes([1 if error is not None else 0, 1 if skip else 0])
    records = _gather_bytes(flags + digest + gradients_digest, group)
    size = len(records)
    failed = [r for r, rec in enumerate(records) if rec[0]]
    if failed:
        message = b""
        if error is not None:
            message = f"{type(error).__name__}: {error}".encode("utf-8", "replace")
            message = message[: _MESSAGE - 2]
        record = len(message).to_bytes(2, "little") + message
        messages = _gather_bytes(record.ljust(_MESSAGE, b"\0"), group)
        errors = {
            r: messages[r][2 : 2 + int.from_bytes(messages[r][:2], "little")].decode("utf-8", "replace")
            for r in failed
        }
        others = failed[1:]
        more = f" (and on rank(s) {others})" if others else ""
        raise ShardedStepError(
            f"RMSprop (state sharded over {size} ranks): the step failed on rank "
            f"{failed[0]}{more}: {errors[failed[0]]} -- nothing changed on any rank",
            errors,
        ) from error
    digests = [rec[2 : 2 + _FINGERPRINT] for rec in records]
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ShardedStepError(
            f"RMSprop (state sharded over {size} ranks): rank(s) {differ} disagree "
            "with rank 0 on the step (gradient leaves' paths, shapes or dtypes, the "
            "optimizer's options, step count or learning rate differ) -- nothing "
            "changed on any rank",
            {r: "disagrees with rank 0" for r in differ},
        )
    if any(rec[1] for rec in records):
        return True
    norms = [rec[2 + _FINGERPRINT :] for rec in records]
    differ = [r for r, d in enumerate(norms) if d != norms[0]]
    if differ:
        raise ShardedStepError(
            f"RMSprop (state sharded over {size} ranks): rank(s) {differ} hold other "
            "gradients than rank 0 (their global norms differ; average them first, "
            "e.g. with mlx.nn.average_gradients) -- nothing changed on any rank",
            {r: "other gradients than rank 0" for r in differ},
        )
    return False


# ---- Checkpoints.


def piece_record(leaf_index: int, leaf: Leaf, piece: Piece) -> mx.array:
    """``[leaf index, start, stop, ndim, *shape]`` (int64) of a piece."""
    return mx.array(
        [leaf_index, piece.start, piece.stop, len(leaf.shape), *leaf.shape], dtype=mx.int64
    )


def assemble(per_rank: Sequence[dict[str, mx.array]], full_precision: bool = False) -> dict:
    """The full state tree from every rank's ``sharded_state_dict()``; 8-bit
    entries dequantized to float32 with ``full_precision``."""
    if not per_rank:
        raise ValueError("RMSprop.assemble_state: no per-rank state was given")
    headers = []
    models = set()  # the leaves' digests (none in files written before they were)
    for i, flat in enumerate(per_rank):
        if not isinstance(flat, dict) or SHARD_KEY not in flat:
            raise ValueError(
                f"RMSprop.assemble_state: state {i} has no '{SHARD_KEY}' entry "
                "(pass what RMSprop.sharded_state_dict() returned on each rank)"
            )
        rank, size, total, *digest = (int(x) for x in flat[SHARD_KEY].tolist())
        headers.append((rank, size, total))
        models.add(tuple(digest))
    size = headers[0][1]
    ranks = sorted(h[0] for h in headers)
    if ranks != list(range(size)) or any(h[1] != size for h in headers):
        raise ValueError(
            f"RMSprop.assemble_state: expected the states of ranks 0..{size - 1} "
            f"of one {size}-rank group, got ranks {ranks}"
        )
    if len({h[2] for h in headers}) != 1 or len(models) != 1:
        raise ValueError("RMSprop.assemble_state: the states come from different models")
    first = per_rank[headers.index(min(headers))]
    scalars = {}
    for name in SCALAR_ENTRIES:
        values = [flat.get(name) for flat in per_rank]
        if values[0] is None:
            continue
        if any(v is None or not mx.array_equal(v, values[0]).item() for v in values):
            raise ValueError(
                f"RMSprop.assemble_state: the ranks' '{name}' differ (states of different steps?)"
            )
        scalars[name] = first[name]

    # leaf index -> (path, shape, {name: [(start, stop, piece)]})
    leaves: dict[int, tuple[str, tuple, dict]] = {}
    for flat in per_rank:
        entries_at: dict[str, dict[str, mx.array]] = {}
        for key, value in flat.items():
            if key in SCALAR_ENTRIES or key == SHARD_KEY or key.endswith(PIECE_SUFFIX):
                continue
            path, _, name = key.rpartition(".")
            entries_at.setdefault(path, {})[name] = value
        for key, rec in flat.items():
            if not key.endswith(PIECE_SUFFIX):
                continue
            path = key[: -len(PIECE_SUFFIX)]
            index, start, stop, ndim, *shape = (int(x) for x in rec.tolist())
            shape = tuple(shape[:ndim])
            entry = leaves.setdefault(index, (path, shape, {}))
            if entry[0] != path or entry[1] != shape:
                raise ValueError(
                    f"RMSprop.assemble_state: leaf {index} is '{entry[0]}' {entry[1]} on "
                    f"one rank and '{path}' {shape} on another"
                )
            for name, piece in entries_at.get(path, {}).items():
                # An 8-bit entry's scales cover the piece's blocks.
                a, b = start, stop
                if name.endswith(_state.SCALE_SUFFIX):
                    a, b = start // _state.BLOCK, _state.blocks(stop)
                if piece.shape != (b - a,):
                    raise ValueError(
                        f"RMSprop.assemble_state: '{path}.{name}' has shape {piece.shape}, "
                        f"its range [{a}, {b}) needs ({b - a},)"
                    )
                entry[2].setdefault(name, []).append((a, b, piece))
    if sorted(leaves) != list(range(len(leaves))):
        raise ValueError("RMSprop.assemble_state: some leaves have no piece on any rank")
    items: list[tuple[str, mx.array]] = list(scalars.items())
    for index in sorted(leaves):
        path, shape, entries = leaves[index]
        leaf_items = []
        for name, pieces in entries.items():
            scale = name.endswith(_state.SCALE_SUFFIX)
            numel = _state.blocks(math.prod(shape)) if scale else math.prod(shape)
            pieces.sort(key=lambda t: t[0])
            covered = 0
            for start, stop, _ in pieces:
                if start != covered:
                    break
                covered = stop
            if covered != numel:
                raise ValueError(
                    f"RMSprop.assemble_state: the pieces of '{path}.{name}' do not cover "
                    f"its {numel} elements exactly (a rank's state is missing?)"
                )
            parts = [p for s, e, p in pieces if e > s]
            if not parts:
                full = pieces[0][2]
            elif len(parts) == 1:
                full = parts[0]
            else:
                full = mx.concatenate(parts)
            leaf_items.append((name, full if scale else full.reshape(shape)))
        leaf_state = dict(leaf_items)
        if full_precision:
            leaf_state = _state.full_precision(leaf_state)
        items.extend((f"{path}.{name}", value) for name, value in leaf_state.items())
    return tree_unflatten(items)


# ---- The sharded optimizer: everything RMSprop does with shard_group.


def check_sharding(group: Any, bucket_bytes: Any) -> None:
    """Raise ValueError unless ``group`` and ``bucket_bytes`` can shard a state."""
    if group is not None and not isinstance(group, mx.distributed.Group):
        raise ValueError(
            f"RMSprop shard_group should be None or an mlx.core.distributed.Group, "
            f"{type(group).__name__} was provided instead"
        )
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes <= 0:
        raise ValueError(
            f"RMSprop shard_bucket_bytes should be an int > 0, "
            f"{bucket_bytes} was provided instead"
        )


def _at(tree: Any, keys: tuple) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _first_difference(a: ShardPlan, b: ShardPlan) -> str:
    sa, sb = a.signature(), b.signature()
    for x, y in zip(sa, sb):
        if x != y:
            return f"'{x[0]}' {x[1]} {x[2]} where the state has '{y[0]}' {y[1]} {y[2]}"
    return f"{len(sa)} leaves where the state has {len(sb)}"


def _piece_of(entry: mx.array, name: str, piece: Piece) -> mx.array:
    """A piece's part of a full leaf's state entry: its elements, or for an
    8-bit scale its blocks (pieces of 8-bit leaves start at a block)."""
    if name.endswith(_state.SCALE_SUFFIX):
        return entry[piece.start // _state.BLOCK : _state.blocks(piece.stop)]
    return entry.reshape(-1)[piece.start : piece.stop]


@dataclass
class _Pieces:
    """This rank's pieces of one step: what the fused update takes."""

    grads: list = field(default_factory=list)
    params: list = field(default_factory=list)
    states: list = field(default_factory=list)
    places: list = field(default_factory=list)  # (leaf, start) for stochastic rounding
    index: list = field(default_factory=list)  # into plan.pieces


class ShardedState:
    """The state of one :class:`~mlx_fused_rmsprop.RMSprop` sharded over its
    ``shard_group`` (see the class docstring): the plan, a loaded full state
    waiting to be sliced, and every step's checks, agreement, update and
    gather. The optimizer calls :meth:`step` once per step."""

    def __init__(self, opt: Any):
        self.opt = opt
        self.group: mx.distributed.Group = opt.shard_group
        self.plan: Optional[ShardPlan] = None
        self.pending_full: Optional[dict] = None

    # ---- The step.

    def step(self, gradients: Any, parameters: Any) -> Any:
        """One sharded step: check locally, agree, update own pieces, gather."""
        opt = self.opt
        error: Optional[BaseException] = None
        digest = gradients_digest = b""
        skip = False
        # The collectives below must run in the same order on every rank, and
        # the gradients usually hang on a pending one (the all_sum of
        # nn.average_gradients), the parameters maybe too (a broadcast of the
        # initial weights): run those first, on every rank alike -- a rank's
        # gather depends only on its own pieces (or on none), so it would not.
        try:
            mx.eval(gradients)
            options, plan, state, pieces = self.check(gradients, parameters)
            mx.eval(self._leaf_params(plan, parameters))
            scheduled, step = opt._next_step()
            lr = scheduled.get("learning_rate", opt._state.get("learning_rate"))
            # Every rank holds the (averaged) gradients: the norm needs no
            # extra collective; the agreement checks that the ranks' norms
            # match and makes a skip everyone's.
            guards = opt._compute_guards(gradients)
            if guards is not None:
                mx.eval(guards.norm)
                skip = guards.skip is not None and bool(guards.skip.item())
                gradients_digest = fingerprint(float(guards.norm.item()))
            digest = fingerprint(
                plan.signature(), repr(options), str(opt.state_dtype),
                opt.shard_bucket_bytes, int(opt.step), float(lr),
            )
        except Exception as e:  # every rank must hear of it: see agree()
            error = e
        skip = agree(self.group, error, digest, skip, gradients_digest)

        if state is not None:
            self._install(plan, state)
        if skip:
            # This rank's own flag may be False while another rank's is True.
            guards.skip = mx.array(True)
            opt._commit_step(scheduled, step, guards)
            return self._param_tree(gradients, parameters)
        updated = _ext.optimizer_step(
            pieces.grads, pieces.params, pieces.states, lr, step, options,
            opt._half_state_dtype(), True, **opt._step_values(guards),
            places=pieces.places,
        )
        leaves = gather_parameters(
            plan, dict(zip(pieces.index, updated)), self._leaf_params(plan, parameters),
            self.group,
        )
        opt._commit_step(scheduled, step, guards)
        it = iter(leaves)
        return tree_map(lambda _: next(it), gradients)

    def check(self, gradients: Any, parameters: Any) -> tuple:
        """Every check of a sharded step on this rank; changes nothing.

        Returns (options, plan, new state or None, this rank's pieces); the
        new state is set when the state is still to be created or sliced
        from a loaded full state.
        """
        opt = self.opt
        opt._check_settings()
        options = opt._make_options()
        _options.optimizer_step(
            gradients, parameters, {}, None, None, options, opt._half_state_dtype(),
            False, allow_missing_state=True,
        )
        if opt._initialized and self.plan is not None:
            plan = self._make_plan(gradients, options)
            if plan.signature() != self.plan.signature():
                raise ValueError(
                    "RMSprop: the gradients' leaves "
                    f"({_first_difference(plan, self.plan)}) differ from the ones "
                    "the sharded state was built for"
                )
            plan, state = self.plan, None
        else:
            plan, state = self._candidate(gradients, parameters, options)
        tree = opt._state if state is None else state
        pieces = _Pieces()
        leaf_params = self._leaf_params(plan, parameters)
        leaf_grads = [g for _, g in flatten(gradients)]
        for i, piece in enumerate(plan.pieces):
            if piece.rank != plan.rank or piece.size == 0:
                continue
            pieces.index.append(i)
            pieces.grads.append(leaf_grads[piece.leaf].reshape(-1)[piece.start : piece.stop])
            pieces.params.append(leaf_params[piece.leaf].reshape(-1)[piece.start : piece.stop])
            pieces.states.append(_at(tree, plan.leaves[piece.leaf].keys))
            pieces.places.append((piece.leaf, piece.start))
        # Raises naming the piece's position; the state was made by this
        # class, so this fires only if it was altered by hand.
        _ext.optimizer_step(
            pieces.grads, pieces.params, pieces.states, None, None, options,
            opt._half_state_dtype(), False,
        )
        return options, plan, state, pieces

    # ---- The state.

    def init(self, parameters: Any) -> None:
        """Lay the state out for ``parameters`` (see RMSprop.init)."""
        opt = self.opt
        options = opt._make_options()
        _options.optimizer_step(
            parameters, parameters, {}, None, None, options, opt._half_state_dtype(),
            False, allow_missing_state=True,
        )
        plan, state = self._candidate(parameters, parameters, options)
        self._install(plan, state)

    def load_full_state(self, state: dict) -> None:
        """Take a full state's scalar entries now, slice the rest into this
        rank's pieces at the next step (see RMSprop.load_full_state)."""
        if not isinstance(state, dict):
            raise ValueError(
                f"RMSprop: the optimizer state must be a dict, got {type(state).__name__}"
            )
        missing = [name for name in _state.REQUIRED_SCALARS if name not in state]
        if missing:
            raise ValueError(f"RMSprop: the optimizer state has no entry '{missing[0]}'")
        opt = self.opt
        scalars = {name: state[name] for name in SCALAR_ENTRIES if name in state}
        opt._state = _state.converted(scalars, {}, opt._layout(), opt._add_scalar_entries)
        self.pending_full = state
        self.plan = None
        opt._initialized = False

    def state_dict(self) -> dict[str, mx.array]:
        """This rank's checkpoint (see RMSprop.sharded_state_dict)."""
        if self.plan is None:
            raise ValueError(
                "RMSprop.sharded_state_dict: the sharded state does not exist yet "
                "(take a step or call init(model.trainable_parameters()) first)"
            )
        plan = self.plan
        opt = self.opt
        out: dict[str, mx.array] = {}
        for name in SCALAR_ENTRIES:
            if name in opt._state:
                out[name] = mx.array(opt._state[name])
        out[SHARD_KEY] = mx.array(
            [plan.rank, plan.ranks, plan.total, *leaves_digest(plan)], dtype=mx.int64
        )
        for piece in plan.own_pieces():
            leaf = plan.leaves[piece.leaf]
            for name, value in _at(opt._state, leaf.keys).items():
                out[f"{leaf.path}.{name}"] = value
            out[leaf.path + PIECE_SUFFIX] = piece_record(piece.leaf, leaf, piece)
        return out

    def _make_plan(self, gradients: Any, options: Any) -> ShardPlan:
        layout = self.opt._layout(options)
        return make_plan(
            gradients, self.group.size(), self.group.rank(), self.opt.shard_bucket_bytes,
            layout.quantizes,
        )

    def _candidate(self, gradients: Any, parameters: Any, options: Any) -> tuple:
        """The plan for ``gradients`` and this rank's new state tree (fresh, or
        sliced from the loaded full state after converting and checking it);
        changes nothing."""
        opt = self.opt
        layout = opt._layout(options)
        plan = self._make_plan(gradients, options)
        full = self.pending_full
        has_entries = False
        if full is not None:
            leaves = {k: v for k, v in full.items() if k not in SCALAR_ENTRIES}
            full = {**full, **_state.map_leaves(leaves, parameters, layout.convert)}
            _state.check_assigned(full, gradients, parameters, layout, SCALAR_ENTRIES)
            has_entries = any(
                isinstance(v, mx.array)
                for k, v in flatten(full)
                if k[0] not in SCALAR_ENTRIES
            )
        own = {p.leaf: p for p in plan.own_pieces()}
        nodes = []
        for i, leaf in enumerate(plan.leaves):
            piece = own.get(i)
            node: dict = {}
            if piece is not None:
                if has_entries:
                    for name, value in _at(full, leaf.keys).items():
                        node[name] = _piece_of(value, name, piece)
                else:
                    layout.init(
                        (piece.size,), leaf.dtype, node, layout.quantizes(leaf.size, leaf.dtype)
                    )
            nodes.append(node)
        it = iter(nodes)
        return plan, tree_map(lambda _: next(it), gradients)

    def _install(self, plan: ShardPlan, tree: dict) -> None:
        opt = self.opt
        scalars = {k: opt._state[k] for k in SCALAR_ENTRIES if k in opt._state}
        opt._state = {**scalars, **tree}
        self.plan = plan
        self.pending_full = None
        opt._initialized = True
        opt._layout_key = opt._layout_signature()

    @staticmethod
    def _leaf_params(plan: ShardPlan, parameters: Any) -> list:
        return [_at(parameters, leaf.keys) for leaf in plan.leaves]

    @staticmethod
    def _param_tree(gradients: Any, parameters: Any) -> Any:
        """The parameters at the gradients' leaves (a skipped step's result)."""
        return tree_map(lambda _, p: p, gradients, parameters)
