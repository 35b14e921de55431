"""Coupled channel groups, read from the program: which parameter axes must be pruned together.

``channel_groups`` traces ``apply_fn`` to a jaxpr (every tree leaf an input) and labels every axis of
every value with the *channel space* it indexes. Each leaf axis starts a space; an op that ties two
axes (an elementwise op, a contraction, a batch dimension) unites their spaces (union-find); a
concatenation or a flatten gives an axis made of several spaces at known positions; a reshape that
splits an axis splits its space. A space is *prunable* when every way its channels reach the output is
understood: through per-channel ops into a contraction with a parameter (the *consumer*: a Dense or
Conv kernel's input axis). A space that reaches the model's input or output, is reduced over, is
contracted between two computed tensors (attention scores: the scale may depend on the width), or
meets an op the analysis does not know is unprunable, with the reason.

A *member* is ``(path, axis, index)``: channel ``c`` of the group is the slice ``index[c]`` of the
leaf's ``axis`` (``index`` None: the slice ``c`` itself; a flatten into a Dense gives strided rows).

The analysis reads shapes and op parameters only (no values), one pass over the equations.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from dataclasses import dataclass, replace

import jax
import jax.extend.core as jcore
import numpy as np

from ._tree import is_array, path_str

# Ops that act entry by entry (size-1 axes broadcast): they tie the spaces of equal-sized axes.
_ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type
    copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma imag integer_pow
    is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow real reduce_precision
    rem round rsqrt select_n shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt
    square stop_gradient sub tan tanh xor optimization_barrier""".split()
)
# Elementwise ops through which a parameter stays itself up to a factor (a pruned zero stays zero).
_ZERO_PRESERVING = frozenset("convert_element_type copy copy_p reduce_precision mul neg".split())
_REDUCE = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin".split()
)
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
_CALLS = {  # call-like primitives and the parameter holding their body
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}
_WINDOW_AXIS = "a conv window axis"  # a kernel's spatial axis: summarized in the table
_WINDOW = frozenset("reduce_window_max reduce_window_min reduce_window_sum".split())


@dataclass(frozen=True, eq=False)
class Member:
    """One coupled axis of one leaf: channel ``c`` is the slice ``index[c]`` along ``axis``.

    ``index`` is an int array ``(width, r)`` (a flatten into a Dense: ``r`` strided rows per
    channel; a concatenation: an offset), or None when channel ``c`` is position ``c``. ``role`` is
    ``"in"`` for an axis a contraction sums over (a kernel's input axis: the channel's consumer),
    ``"out"`` for a contraction's output axis (a kernel's output features), ``""`` otherwise (a bias,
    a norm's scale or statistics, a depthwise kernel).
    """

    path: str
    axis: int
    index: np.ndarray | None
    role: str

    def positions(self, size: int) -> np.ndarray:
        """``(width, r)`` positions along the axis (``size`` = the axis length)."""
        return np.arange(size)[:, None] if self.index is None else self.index

    def __str__(self):
        s = f"{self.path}[{self.axis}]"
        if self.index is not None:
            s += f"x{self.index.shape[1]}" if self.index.shape[1] > 1 else "+"
        return s


@dataclass(frozen=True, eq=False)
class Group:
    """A channel space: ``width`` channels, the members that index them, and why it cannot be pruned
    (``reason``; None when it can)."""

    id: int
    width: int
    members: tuple[Member, ...]
    reason: str | None
    varies: str | None = None  # how the input reaches the channels besides their producers

    @property
    def prunable(self) -> bool:
        return self.reason is None

    @property
    def name(self) -> str:
        """The first kernel output axis among the members (else the first member): ``path[axis]``."""
        return str(next((m for m in self.members if m.role == "out"), self.members[0]))


class Groups:
    """The channel groups of a model (``channel_groups``); iterate, index or ``print`` it.

    Attributes:
      groups: every group holding a leaf axis, prunable or not, in leaf order.
      paths: the leaf paths, in the tree's flattening order.
      shapes: the leaf shapes.
    """

    def __init__(self, groups, paths, shapes, treedef, program, consumers=None, bias=None):
        self.groups = tuple(groups)
        self.paths = tuple(paths)
        self.shapes = tuple(shapes)
        self.treedef = treedef
        self.program = program  # (closed jaxpr, array leaves of the example inputs): for folding
        self.consumers = consumers or {}  # (leaf, axis) -> [(contraction eqn, activation side, kernel dim)]
        self.bias = bias or {}  # id(contraction eqn) -> ((bias leaf, axis map), bias operand shape)

    def __iter__(self):
        return iter(self.groups)

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, i):
        return self.groups[i]

    @property
    def prunable(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def __repr__(self):
        head = (
            f"{len(self.prunable)} prunable of {len(self.groups)} channel groups "
            "(members as path[axis]; xR: R positions per channel, +: at an offset)"
        )
        lines = [head, f"{'group':>5}  {'width':>5}  prunable  members"]
        windows = [g for g in self.groups if g.reason == _WINDOW_AXIS]
        for g in self.groups:
            if g.reason == _WINDOW_AXIS:
                continue
            status = "yes" if g.prunable else "no"
            line = f"{g.id:>5}  {g.width:>5}  {status:<8}  " + " ".join(str(m) for m in g.members)
            lines.append(line if g.prunable else f"{line}  ({g.reason})")
        if windows:
            lines.append(
                f"  and {len(windows)} conv window axes (groups {', '.join(str(g.id) for g in windows)})"
            )
        return "\n".join(lines)


# --- the analysis ---------------------------------------------------------------------------------
# A label describes one axis of one value: None when the value is uniform along it (size 1 or
# broadcast), else a tuple of parts (node, pos): channel c of space `node` sits at positions pos[c]
# of the axis (pos None: position c). Positions no part claims belong to no space.


class _Analysis:
    def __init__(self):
        self.parent: list[int] = []
        self.width: list[int] = []
        self.reason: list[str | None] = []
        self.members: list[list] = []  # per root: [(leaf, axis, pos)]
        self.alias: dict[int, tuple] = {}  # a dissolved root: its label in terms of other spaces
        self.roles: dict[tuple[int, int], set] = {}
        self.labels: dict = {}
        self.zview: dict = {}  # var -> (leaf, axis map): a leaf up to zero-preserving ops
        self.data: set = set()  # vars that depend on the model's inputs
        self.varies: dict[int, str] = {}  # root -> how the input enters its values besides producers
        self.consumers: dict[tuple[int, int], list] = {}  # (leaf, axis) -> [(eqn, act side, kernel dim)]
        self.made_by: dict = {}  # var -> the contraction eqn that made it
        self.bias: dict = {}  # id(contraction eqn) -> (leaf, axis map) of the bias added to its output
        self.uses: dict = {}  # var -> number of uses

    # union-find over spaces
    def new(self, width, reason=None):
        self.parent.append(len(self.parent))
        self.width.append(width)
        self.reason.append(reason)
        self.members.append([])
        return len(self.parent) - 1

    def find(self, x):
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def resolve(self, label):
        """The label in terms of live roots (dissolved spaces expanded into their parts)."""
        if label is None:
            return None
        out = []
        for node, pos in label:
            r = self.find(node)
            if r in self.alias:
                for n2, p2 in self.resolve(self.alias[r]):
                    out.append((n2, _compose(pos, p2)))
            else:
                out.append((r, pos))
        return tuple(out) if out else None

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.width[ra] != self.width[rb]:  # cannot happen for equal-sized axes; refuse if it does
            self.pin_nodes([ra, rb], "axes of different widths were tied")
            return
        if len(self.members[ra]) < len(self.members[rb]):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.members[ra].extend(self.members[rb])
        self.members[rb] = []
        self.reason[ra] = self.reason[ra] or self.reason[rb]
        if rb in self.varies and ra not in self.varies:
            self.varies[ra] = self.varies[rb]

    def pin_nodes(self, nodes, reason):
        for n in nodes:
            r = self.find(n)
            if self.reason[r] is None:
                self.reason[r] = reason

    def pin(self, label, reason):
        label = self.resolve(label)
        if label is not None:
            self.pin_nodes([n for n, _ in label], reason)

    def vary(self, label, reason):
        """The input reaches these channels other than through a producer (a kernel's output)."""
        for n, _ in self.resolve(label) or ():
            self.varies.setdefault(self.find(n), reason)

    def dissolve(self, root, label, where):
        """Space ``root`` (identity on an axis) is that axis's composite ``label``."""
        if any(n == root for n, _ in label):
            self.pin_nodes([root], f"{where}: an axis built from itself")
            return
        for leaf, axis, pos in self.members[root]:
            for n, p in label:
                self.members[self.find(n)].append((leaf, axis, _compose(pos, p)))
        if self.reason[root] is not None:
            self.pin_nodes([n for n, _ in label], self.reason[root])
        if root in self.varies:
            self.vary(label, self.varies[root])
        self.members[root] = []
        self.alias[root] = label

    def unify(self, a, b, where):
        """The label of an axis that is both ``a`` and ``b`` (the same positions)."""
        a, b = self.resolve(a), self.resolve(b)
        if a is None:
            return b
        if b is None:
            return a
        if len(a) == len(b) and all(
            self.width[na] == self.width[nb] and _same(pa, pb) for (na, pa), (nb, pb) in zip(a, b)
        ):
            for (na, _), (nb, _) in zip(a, b):
                self.union(na, nb)
            return a
        for x, y in ((a, b), (b, a)):
            if len(x) == 1 and x[0][1] is None:
                self.dissolve(x[0][0], y, where)
                return y
        self.pin(a, f"{where} ties differently laid-out channels")
        self.pin(b, f"{where} ties differently laid-out channels")
        return a

    def fresh(self, shape, reason):
        return tuple(((self.new(s, reason), None),) if s > 1 else None for s in shape)

    # the program
    def read(self, v):
        if isinstance(v, jcore.Literal):
            return (None,) * np.ndim(v.val)
        return self.labels[v]

    def run(self, jaxpr, consts_labels):
        for v, lab in zip(jaxpr.constvars, consts_labels):
            self.labels[v] = lab
        for v in [w for e in jaxpr.eqns for w in e.invars] + list(jaxpr.outvars):
            if not isinstance(v, jcore.Literal):
                self.uses[v] = self.uses.get(v, 0) + 1
        for eqn in jaxpr.eqns:
            self.eqn(eqn)

    def eqn(self, eqn):
        prim = eqn.primitive.name
        ins = [self.read(v) for v in eqn.invars]
        inshapes = [tuple(v.aval.shape) for v in eqn.invars]
        data = any(not isinstance(v, jcore.Literal) and v in self.data for v in eqn.invars)
        outs = getattr(self, "op_" + prim, None)
        if prim in _ELEMENTWISE:
            outs = [self.elementwise(prim, ins, inshapes, tuple(eqn.outvars[0].aval.shape), eqn.invars)]
            self.zero_view(eqn, prim)
            if prim in ("add", "add_any"):
                self.find_bias(eqn)
        elif prim in _REDUCE:
            outs = [self.reduce(prim, ins[0], eqn.params["axes"])]
        elif prim in _CUMULATIVE:
            self.pin(ins[0][eqn.params["axis"]], f"{prim} along the channels")
            outs = [ins[0]]
        elif prim in _CALLS:
            outs = self.call(eqn, prim, ins)
        elif prim in _WINDOW:
            outs = [self.window(eqn, prim, ins[0], inshapes[0])]
        elif outs is not None:
            outs = outs(eqn, ins, inshapes)
        else:
            outs = self.unknown(eqn, prim, ins)
        for v, lab in zip(eqn.outvars, outs):
            self.labels[v] = lab
            if data:
                self.data.add(v)

    def unknown(self, eqn, prim, ins):
        where = _where(eqn)
        for i, lab in enumerate(ins):
            for d, a in enumerate(lab):
                self.pin(a, f"{prim} (not understood) on axis {d} of operand {i}{where}")
        return [self.fresh(v.aval.shape, f"output of {prim}{where}") for v in eqn.outvars]

    def elementwise(self, prim, ins, inshapes, shape, invars):
        out = []
        for d, size in enumerate(shape):
            lab, spread = None, False
            for x, s, v in zip(ins, inshapes, invars):
                if len(s) == len(shape) and s[d] == size:
                    lab = self.unify(lab, x[d], prim)
                elif not isinstance(v, jcore.Literal) and v in self.data:
                    spread = True  # a data-dependent operand broadcast along this axis
            if spread and lab is not None:
                self.vary(lab, f"{prim} with an input-dependent operand broadcast along the channels")
            out.append(lab)
        return tuple(out)

    def find_bias(self, eqn):
        """``add(contraction output, bias)``: where a constant channel's contribution can go."""
        a, b = eqn.invars
        for y, bias in ((a, b), (b, a)):
            if isinstance(y, jcore.Literal) or isinstance(bias, jcore.Literal) or y not in self.made_by:
                continue
            if bias in self.zview and bias not in self.data and self.uses.get(y) == 1:
                made = self.made_by[y]
                self.bias.setdefault(id(made), (self.zview[bias], tuple(bias.aval.shape)))

    def zero_view(self, eqn, prim):
        if prim not in _ZERO_PRESERVING:
            return
        shape = tuple(eqn.outvars[0].aval.shape)
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal) and v in self.zview and tuple(v.aval.shape) == shape:
                self.zview[eqn.outvars[0]] = self.zview[v]
                return

    def reduce(self, prim, lab, axes):
        for d in axes:
            self.pin(lab[d], f"{prim} over the channels")
        return tuple(a for d, a in enumerate(lab) if d not in axes)

    def window(self, eqn, prim, lab, shape):
        p = eqn.params
        out = []
        for d, a in enumerate(lab):
            plain = (
                p["window_dimensions"][d] == 1
                and p["window_strides"][d] == 1
                and tuple(p["padding"][d]) == (0, 0)
                and p["base_dilation"][d] == 1
                and p["window_dilation"][d] == 1
            )
            if plain:
                out.append(a)
                if prim == "reduce_window_sum" and any(tuple(x) != (0, 0) for x in p["padding"]):
                    self.vary(a, f"{prim} with padding (a constant channel changes at the borders)")
            else:
                self.pin(a, f"{prim} window along the channels")
                out.append(self.fresh((eqn.outvars[0].aval.shape[d],), f"{prim} output")[0])
        return tuple(out)

    def call(self, eqn, prim, ins):
        body = eqn.params[_CALLS[prim]]
        closed = body if isinstance(body, jcore.ClosedJaxpr) else None
        jaxpr = closed.jaxpr if closed is not None else body
        consts = [self.fresh(np.shape(c), "a constant") for c in (closed.consts if closed else [])]
        invars = jaxpr.invars
        for outer, inner, lab in zip(eqn.invars, invars, ins):
            self.labels[inner] = lab
            if not isinstance(outer, jcore.Literal):
                if outer in self.data:
                    self.data.add(inner)
                if outer in self.zview:
                    self.zview[inner] = self.zview[outer]
        self.run(jaxpr, consts)
        outs = [self.read(v) for v in jaxpr.outvars]
        for outer, inner in zip(eqn.outvars, jaxpr.outvars):
            if not isinstance(inner, jcore.Literal) and inner in self.zview:
                self.zview[outer] = self.zview[inner]
        return outs

    def contract(self, eqn, pairs, ops, where):
        """Tie contracted axes (``pairs`` of (label, label, dim_lhs, dim_rhs)); mark consumers."""
        views = [None if isinstance(v, jcore.Literal) else self.zview.get(v) for v in ops]
        for la, lb, da, db in pairs:
            self.unify(la, lb, where)
            if views[0] is None and views[1] is None:
                self.pin(la, f"{where} contracts it between two computed tensors")
            for side, (view, d) in enumerate(zip(views, (da, db))):
                if view is not None and view[1][d] is not None:
                    self.roles.setdefault((view[0], view[1][d]), set()).add("in")
                    self.consumers.setdefault((view[0], view[1][d]), []).append((eqn, 1 - side, d))
        for v in eqn.outvars:
            self.made_by[v] = eqn

    def produce(self, ops, free):
        """Mark the output (free) axes of a parameter contracted with data as producers."""
        datas = [not isinstance(v, jcore.Literal) and v in self.data for v in ops]
        for i, (v, dims) in enumerate(zip(ops, free)):
            view = None if isinstance(v, jcore.Literal) else self.zview.get(v)
            if view is not None and datas[1 - i]:
                for d in dims:
                    if view[1][d] is not None:
                        self.roles.setdefault((view[0], view[1][d]), set()).add("out")

    def op_dot_general(self, eqn, ins, shapes):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        L, R = ins
        self.contract(eqn, [(L[a], R[b], a, b) for a, b in zip(lc, rc)], eqn.invars, "dot_general")
        batch = [self.unify(L[a], R[b], "dot_general batch") for a, b in zip(lb, rb)]
        lf = [d for d in range(len(L)) if d not in lc and d not in lb]
        rf = [d for d in range(len(R)) if d not in rc and d not in rb]
        self.produce(eqn.invars, (lf, rf))
        datas = [not isinstance(v, jcore.Literal) and v in self.data for v in eqn.invars]
        views = [not isinstance(v, jcore.Literal) and v in self.zview for v in eqn.invars]
        why = "dot_general with the input on both sides (attention)"
        for lab in batch if all(datas) else ():
            self.vary(lab, why)
        for side, (lab, dims) in enumerate(((L, lf), (R, rf))):
            if datas[1 - side] and not views[side]:
                for d in dims:
                    self.vary(lab[d], why)
        return [tuple(batch) + tuple(L[d] for d in lf) + tuple(R[d] for d in rf)]

    def op_conv_general_dilated(self, eqn, ins, shapes):
        p = eqn.params
        dn = p["dimension_numbers"]
        L, R = ins
        lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        out = [None] * len(ospec)
        out_shape = eqn.outvars[0].aval.shape
        if p["batch_group_count"] != 1:
            return self.unknown(eqn, "conv_general_dilated with batch_group_count", ins)
        out[ospec[0]] = L[lspec[0]]
        for ls, rs, os in zip(lspec[2:], rspec[2:], ospec[2:]):
            self.pin(L[ls], "a conv window along the channels")
            self.pin(R[rs], _WINDOW_AXIS)
            out[os] = self.fresh((out_shape[os],), "conv output positions")[0]
        groups = p["feature_group_count"]
        cin, per, cout = shapes[0][lspec[1]], shapes[1][rspec[1]], shapes[1][rspec[0]]
        lf, rin, rout = L[lspec[1]], R[rspec[1]], R[rspec[0]]
        if groups == 1:
            self.contract(eqn, [(lf, rin, lspec[1], rspec[1])], eqn.invars, "conv")
            self.produce(eqn.invars, ([], [rspec[0]]))
            out[ospec[1]] = rout
        elif per == 1 and cin == groups:  # depthwise: output channel o reads input channel o // m
            m = cout // groups
            lf = self.resolve(lf)
            if m > 1 and lf is not None:
                lf = tuple((n, _expand(pos, self.width[n], m)) for n, pos in lf)
            out[ospec[1]] = self.unify(rout, lf, "depthwise conv")
            if not isinstance(eqn.invars[1], jcore.Literal) and eqn.invars[1] in self.data:
                self.vary(out[ospec[1]], "a depthwise conv with an input-dependent kernel")
            if any(tuple(x) != (0, 0) for x in p["padding"]) or any(d != 1 for d in p["lhs_dilation"]):
                self.vary(
                    out[ospec[1]], "a padded depthwise conv (a constant channel changes at the borders)"
                )
        else:
            reason = f"a grouped conv (feature_group_count={groups}, {per} input channels per group)"
            for a in (lf, rin, rout):
                self.pin(a, reason)
            out[ospec[1]] = rout
        return [tuple(out)]

    def op_transpose(self, eqn, ins, shapes):
        perm = eqn.params["permutation"]
        v = eqn.invars[0]
        if not isinstance(v, jcore.Literal) and v in self.zview:
            leaf, amap = self.zview[v]
            self.zview[eqn.outvars[0]] = (leaf, tuple(amap[d] for d in perm))
        return [tuple(ins[0][d] for d in perm)]

    def op_squeeze(self, eqn, ins, shapes):
        dims = [d % len(shapes[0]) for d in eqn.params["dimensions"]]
        v = eqn.invars[0]
        if not isinstance(v, jcore.Literal) and v in self.zview:
            leaf, amap = self.zview[v]
            self.zview[eqn.outvars[0]] = (leaf, tuple(a for d, a in enumerate(amap) if d not in dims))
        return [tuple(a for d, a in enumerate(ins[0]) if d not in dims)]

    def op_broadcast_in_dim(self, eqn, ins, shapes):
        shape = eqn.params["shape"]
        out = [None] * len(shape)
        for i, d in enumerate(eqn.params["broadcast_dimensions"]):
            if shapes[0][i] == shape[d]:
                out[d] = ins[0][i]
        return [tuple(out)]

    def op_reshape(self, eqn, ins, shapes):
        if eqn.params.get("dimensions") is not None:
            return self.unknown(eqn, "reshape with dimensions", ins)
        src, dst = shapes[0], tuple(eqn.params["new_sizes"])
        lab = ins[0]
        out = [None] * len(dst)
        blocks = _blocks(src, dst)
        simple = all(len(i) == 1 and len(o) == 1 for i, o in blocks)
        v = eqn.invars[0]
        if simple and not isinstance(v, jcore.Literal) and v in self.zview:
            leaf, amap = self.zview[v]
            newmap = [None] * len(dst)
            for (i,), (o,) in blocks:
                newmap[o] = amap[i]
            self.zview[eqn.outvars[0]] = (leaf, tuple(newmap))
        for ia, oa in blocks:
            labs = [self.resolve(lab[d]) for d in ia]
            if all(x is None for x in labs):
                continue
            if len(ia) == 1 and len(oa) == 1:
                out[oa[0]] = labs[0]
            elif len(oa) == 1:  # merge: positions in row-major order of the merged axes
                bshape = [src[d] for d in ia]
                parts = []
                for k, x in enumerate(labs):
                    for n, pos in x or ():
                        parts.append((n, _merged(pos, self.width[n], bshape, k)))
                out[oa[0]] = tuple(parts)
            elif len(ia) == 1 and len(labs[0]) == 1 and labs[0][0][1] is None:  # split a whole space
                sizes = [dst[d] for d in oa]
                news = [self.new(s) for s in sizes]
                grid = np.arange(math.prod(sizes)).reshape(sizes)
                parts = tuple((n, np.moveaxis(grid, k, 0).reshape(sizes[k], -1)) for k, n in enumerate(news))
                self.dissolve(labs[0][0][0], parts, "reshape")
                for k, n in enumerate(news):
                    out[oa[k]] = ((n, None),)
            else:
                for x in labs:
                    self.pin(x, "a reshape that regroups the channels")
                for d in oa:
                    out[d] = self.fresh((dst[d],), "reshape output")[0]
        return [tuple(out)]

    def op_concatenate(self, eqn, ins, shapes):
        dim = eqn.params["dimension"]
        rank = len(shapes[0])
        out = []
        for d in range(rank):
            if d != dim:
                lab = None
                for x in ins:
                    lab = self.unify(lab, x[d], "concatenate")
                out.append(lab)
                continue
            parts, off = [], 0
            for x, s in zip(ins, shapes):
                for n, pos in self.resolve(x[d]) or ():
                    parts.append((n, (np.arange(self.width[n])[:, None] if pos is None else pos) + off))
                off += s[d]
            out.append(tuple(parts) or None)
        return [tuple(out)]

    def op_pad(self, eqn, ins, shapes):
        out = []
        for d, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
            if (lo, hi, interior) == (0, 0, 0):
                out.append(ins[0][d])
            else:
                self.pin(ins[0][d], "pad along the channels")
                out.append(self.fresh((eqn.outvars[0].aval.shape[d],), "pad output")[0])
        return [tuple(out)]

    def cut(self, lab, size, bounds, what):
        """Labels of the pieces ``[a, b)`` of an axis: a whole space is split into one space per
        piece (and the rest); any other labelled axis is pinned."""
        lab = self.resolve(lab)
        if lab is None:
            return [None] * len(bounds)
        if len(lab) == 1 and lab[0][1] is None:
            edges = sorted({0, size, *(x for ab in bounds for x in ab)})
            pieces = {(a, b): self.new(b - a) for a, b in zip(edges, edges[1:])}
            parts = tuple((n, np.arange(a, b)[:, None]) for (a, b), n in pieces.items())
            self.dissolve(lab[0][0], parts, what)
            out = []
            for a, b in bounds:
                inside = [((pieces[e]), None) for e in pieces if a <= e[0] and e[1] <= b]
                if len(inside) == 1:
                    out.append(tuple(inside))
                else:  # a piece made of several spaces: concatenated at offsets
                    parts, off = [], 0
                    for n, _ in inside:
                        parts.append((n, np.arange(self.width[n])[:, None] + off))
                        off += self.width[n]
                    out.append(tuple(parts))
            return out
        self.pin(lab, f"{what} along the channels")
        return [self.fresh((b - a,), f"{what} output")[0] for a, b in bounds]

    def op_slice(self, eqn, ins, shapes):
        p = eqn.params
        out = []
        for d, (a, b) in enumerate(zip(p["start_indices"], p["limit_indices"])):
            step = 1 if p["strides"] is None else p["strides"][d]
            if a == 0 and b == shapes[0][d] and step == 1:
                out.append(ins[0][d])
            elif step == 1:
                out.append(self.cut(ins[0][d], shapes[0][d], [(a, b)], "slice")[0])
            else:
                self.pin(ins[0][d], "a strided slice along the channels")
                out.append(self.fresh((eqn.outvars[0].aval.shape[d],), "slice output")[0])
        return [tuple(out)]

    def op_split(self, eqn, ins, shapes):
        axis, sizes = eqn.params["axis"], eqn.params["sizes"]
        edges = np.cumsum([0, *sizes]).tolist()
        pieces = self.cut(ins[0][axis], shapes[0][axis], list(zip(edges, edges[1:])), "split")
        return [ins[0][:axis] + (lab,) + ins[0][axis + 1 :] for lab in pieces]

    def op_rev(self, eqn, ins, shapes):
        dims = eqn.params["dimensions"]
        for d in dims:
            self.pin(ins[0][d], "rev (reversal) along the channels")
        v = eqn.invars[0]
        if not isinstance(v, jcore.Literal) and v in self.zview:
            self.zview[eqn.outvars[0]] = self.zview[v]
        return [
            tuple(
                self.fresh((s,), "rev output")[0] if d in dims else a
                for d, (a, s) in enumerate(zip(ins[0], shapes[0]))
            )
        ]

    def op_iota(self, eqn, ins, shapes):
        return [self.fresh(eqn.outvars[0].aval.shape, "iota")]

    def op_gather(self, eqn, ins, shapes):
        """A gather that takes whole slices along some operand axes (an embedding lookup) passes
        those axes through; every other labelled axis is pinned."""
        p = eqn.params
        dn = p["dimension_numbers"]
        op, idx = ins
        if getattr(dn, "operand_batching_dims", ()) or getattr(dn, "start_indices_batching_dims", ()):
            return self.unknown(eqn, "gather with batching dims", ins)
        kept = [d for d in range(len(op)) if d not in dn.collapsed_slice_dims]
        out_shape = eqn.outvars[0].aval.shape
        out = [None] * len(out_shape)
        for d, o in zip(kept, dn.offset_dims):
            if p["slice_sizes"][d] == shapes[0][d] and d not in dn.start_index_map:
                out[o] = op[d]
                if not isinstance(eqn.invars[1], jcore.Literal) and eqn.invars[1] in self.data:
                    self.vary(op[d], "gather (an embedding lookup) picks rows by the input")
            else:
                self.pin(op[d], "gather along the channels")
                out[o] = self.fresh((out_shape[o],), "gather output")[0]
        for d in dn.collapsed_slice_dims:
            self.pin(op[d], "gather (an indexed axis)")
        batch = [d for d in range(len(out_shape)) if d not in dn.offset_dims]
        idx_axes = [d for d in range(len(idx)) if d != len(idx) - 1]
        if len(idx_axes) == len(batch):
            for o, d in zip(batch, idx_axes):
                out[o] = idx[d]
        else:
            for o in batch:
                out[o] = self.fresh((out_shape[o],), "gather output")[0]
        return [tuple(out)]


def _where(eqn):
    try:
        from jax._src import source_info_util

        s = source_info_util.summarize(eqn.source_info)
        return f" at {s.rsplit('/', 1)[-1]}" if s else ""
    except Exception:  # noqa: BLE001 - a location is a nicety, never a failure
        return ""


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and np.array_equal(a, b)


def _compose(outer, inner):
    """Positions of channel c of an inner space, through an outer position map."""
    if outer is None:
        return inner
    if inner is None:
        return outer
    return outer[inner].reshape(inner.shape[0], -1)


def _expand(pos, width, m):
    """Depthwise multiplier ``m``: channel c at positions ``pos[c] * m + 0..m-1``."""
    base = np.arange(width)[:, None] if pos is None else pos
    return (base[:, :, None] * m + np.arange(m)).reshape(width, -1)


def _merged(pos, width, bshape, k):
    """Positions in the merged axis (row-major over ``bshape``) of channel c, axis ``k`` at pos[c]."""
    grid = np.arange(math.prod(bshape)).reshape(bshape)
    grid = np.moveaxis(grid, k, 0)
    base = np.arange(width)[:, None] if pos is None else pos
    return grid[base].reshape(width, -1)


def _blocks(src, dst):
    """Pair up axes of a reshape: ``[(in axes, out axes)]`` with equal products; size-1 axes apart."""
    si = [d for d in range(len(src)) if src[d] != 1]
    di = [d for d in range(len(dst)) if dst[d] != 1]
    blocks, i, j = [], 0, 0
    while i < len(si) and j < len(di):
        ia, oa = [si[i]], [di[j]]
        a, b = src[si[i]], dst[di[j]]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                a *= src[si[i]]
                ia.append(si[i])
                i += 1
            else:
                b *= dst[di[j]]
                oa.append(di[j])
                j += 1
        blocks.append((ia, oa))
    return blocks


def _analyze(closed, n) -> _Analysis:
    """Label every axis of the program (its first ``n`` inputs are the tree's leaves)."""
    jaxpr = closed.jaxpr
    an = _Analysis()
    for i, v in enumerate(jaxpr.invars[:n]):
        shape = tuple(v.aval.shape)
        lab = []
        for a, s in enumerate(shape):
            if s > 1:
                node = an.new(s)
                an.members[node].append((i, a, None))
                lab.append(((node, None),))
            else:
                lab.append(None)
        an.labels[v] = tuple(lab)
        an.zview[v] = (i, tuple(range(len(shape))))
    for j, v in enumerate(jaxpr.invars[n:]):
        an.labels[v] = an.fresh(v.aval.shape, f"the model's input (argument leaf {j})")
        an.data.add(v)
    an.run(jaxpr, [an.fresh(np.shape(c), "a constant") for c in closed.consts])
    for j, v in enumerate(jaxpr.outvars):
        for d, lab in enumerate(an.read(v)):
            an.pin(lab, f"reaches the model's output (output {j}, axis {d})")
    return an


def channel_groups(apply_fn, tree, *args, **kwargs) -> Groups:
    """The coupled channel groups of a model, read from its program.

    Traces ``apply_fn(tree, *args, **kwargs)`` (``jax.make_jaxpr``: shapes only, no compute) and
    finds which axes of which leaves index the same channels: a Dense/Conv kernel's output axis, its
    bias, the next norm's scale/bias/statistics and the next kernel's input axis; residual additions
    tie blocks; a concatenation places channels at offsets; a flatten into a Dense maps a channel to
    strided rows; a depthwise conv passes channels through; attention heads tie q/k/v/out; an
    embedding tied to an output head shares its features axis. Sub-programs (jit, custom_jvp/vjp,
    remat) are read through.

    A group is unprunable, with the reason, when its channels reach the model's input or output, are
    reduced over (a LayerNorm, a softmax over features), contracted between two computed tensors
    (attention scores), or meet an op the analysis does not understand — it is never guessed.

    Python code that uses a width as a *number* (``x / jnp.sqrt(x.shape[-1])``) is invisible in one
    trace, so the program is traced a second time with one channel fewer per prunable group; a
    literal or equation that changes, a failure, or channels laid out elsewhere (a reshape with a
    fixed head count) makes the group unprunable. A Linen module is retraced with its parameter
    shape checks off; one that still fails (a width in its constructor, such as a depthwise conv's
    ``feature_group_count``) cannot be checked: there, check ``shrink``'s result on your inputs if
    your model reads widths as numbers.

    Args:
      apply_fn: ``apply_fn(tree, *args, **kwargs)``, e.g. ``model.apply`` for Linen (pass all
        variables, params and batch_stats, for a BatchNorm model, in inference mode), or
        ``lambda state, x: nnx.merge(graphdef, state)(x)`` for NNX (as ``jp.nnx.channel_groups`` does).
      tree: the variables: a pytree of arrays; every leaf is an input of the program.
      *args, **kwargs: example inputs: array leaves are the program's inputs (only their shapes and
        dtypes matter for the groups; ``shrink`` evaluates the program on them to fold constant
        channels); other leaves (``train=False``) are passed as they are.

    Returns:
      A ``Groups``: ``print`` it for a table of groups (width, members as ``path[axis]``, prunable
      or why not).

    Raises:
      TypeError: a leaf of ``tree`` is not an array.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jprune as jp
      >>> mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
      >>> x = jnp.ones((1, 3))
      >>> params = mlp.init(jax.random.key(0), x)
      >>> groups = jp.channel_groups(mlp.apply, params, x)
      >>> [str(m) for m in groups.prunable[0].members]
      ['params/layers_0/bias[0]', 'params/layers_0/kernel[1]', 'params/layers_2/kernel[0]']
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_str(p) for p, _ in flat]
    leaves = [v for _, v in flat]
    for p, v in zip(paths, leaves):
        if not is_array(v):
            raise TypeError(f"channel_groups: the leaf at {p!r} is a {type(v).__name__}, not an array")
    everything, arg_def = jax.tree_util.tree_flatten((args, kwargs))
    inputs = [i for i, a in enumerate(everything) if isinstance(a, jax.Array | np.ndarray)]
    arg_leaves = [everything[i] for i in inputs]  # arrays are inputs; the rest (train=False) static

    def program(leaves, arg_leaves):
        filled = list(everything)
        for i, a in zip(inputs, arg_leaves):
            filled[i] = a
        a, k = jax.tree_util.tree_unflatten(arg_def, filled)
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves), *a, **k)

    closed = jax.make_jaxpr(program)(leaves, arg_leaves)
    an = _analyze(closed, len(leaves))
    shapes = [np.shape(v) for v in leaves]
    groups = _collect(an, paths, shapes, treedef, (closed, arg_leaves))
    return _check_widths(groups, program, leaves, arg_leaves)


_UNCHECKED = "unchecked"


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else np.result_type(x)


def _check_widths(groups: Groups, program, leaves, arg_leaves) -> Groups:
    """Trace the program again with one or two channels fewer (alternately, so groups that must
    shrink alike show) in every prunable group, then each group alone if that differs: a literal
    or an equation that changes means Python code used a width as a number (``1 / sqrt(d)``) or
    branched on it; a program that fails, or lays the remaining channels out other than where
    ``shrink`` puts them (``x.reshape(b, heads, -1)`` with a fixed ``heads``), read a width as a
    number too; such a group is made unprunable (one more trace when nothing changes). A Linen
    module is retraced with its parameter shape checks off; one that still fails (widths in its
    constructor) is checked group by group where it can be, else not at all."""
    todo = [g for g in groups.prunable if g.width > 1]
    if not todo:
        return groups
    index = {p: i for i, p in enumerate(groups.paths)}

    def trace(chosen):  # chosen: [(group, how many channels fewer)]
        shapes = [list(s) for s in groups.shapes]
        gone: dict = {}  # (leaf, axis) -> removed positions (groups laid out as a product overlap)
        for g, r in chosen:
            for m in g.members:
                i = index[m.path]
                pos = m.positions(groups.shapes[i][m.axis])[-r:].ravel()
                gone.setdefault((i, m.axis), set()).update(pos.tolist())
        for (i, axis), pos in gone.items():
            shapes[i][axis] -= len(pos)
        structs = [jax.ShapeDtypeStruct(tuple(s), _dtype(v)) for s, v in zip(shapes, leaves)]
        args = [jax.ShapeDtypeStruct(np.shape(a), _dtype(a)) for a in arg_leaves]
        try:
            closed = jax.make_jaxpr(program)(structs, args)
        except Exception as e:  # noqa: BLE001 - reported as the group's reason, or no check (Linen)
            if type(e).__name__ != "ScopeParamShapeError":
                msg = str(e).strip().split("\n")[0][:160]
                return f"the program fails at a smaller width ({type(e).__name__}: {msg})"
            try:  # a Linen module checks its parameters against its constructor: read them as given
                with _linen_shapes_unchecked():
                    closed = jax.make_jaxpr(program)(structs, args)
            except Exception:  # noqa: BLE001 - widths in the constructor (feature_group_count): no check
                return _UNCHECKED
        return _difference(groups.program[0], closed) or _moved(groups, chosen, closed, shapes)

    # one or two channels fewer, alternately: groups that must shrink alike (jnp.split(x, 2)) differ
    first = trace([(g, 2 if k % 2 and g.width > 2 else 1) for k, g in enumerate(todo)])
    if first is None:
        return groups
    why = {g.id: trace([(g, 1)]) for g in todo}  # unchecked (Linen): each group on its own
    why = {k: (None if w is _UNCHECKED else w) for k, w in why.items()}
    if not any(why.values()):
        if first is _UNCHECKED:
            return groups
        why = {g.id: "the program changes when the widths do" for g in todo}  # only together
    out = [
        replace(g, reason=f"the width is used as a number: {why[g.id]}") if why.get(g.id) else g
        for g in groups
    ]
    return Groups(
        out, groups.paths, groups.shapes, groups.treedef, groups.program, groups.consumers, groups.bias
    )


_UNCHECKED_HERE = threading.local()  # set while this thread retraces a Linen module
_WRAP_LOCK = threading.Lock()


@contextlib.contextmanager
def _linen_shapes_unchecked():
    """In this thread only, Linen's ``Scope.param`` returns an existing parameter without comparing
    its shape with the module's constructor (for the width check's retrace only).

    ``Scope.param`` is wrapped once, and the wrapper changes nothing unless the calling thread is
    inside this context: Linen code running meanwhile in other threads keeps its shape checks."""
    from flax.core import meta
    from flax.core.scope import Scope

    with _WRAP_LOCK:
        if not getattr(Scope.param, "_jprune_unchecked", False):
            checked = Scope.param

            @functools.wraps(checked)
            def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
                if getattr(_UNCHECKED_HERE, "on", False) and self.has_variable("params", name):
                    self.reserve(name, "params")
                    value = self.get_variable("params", name)
                    return meta.unbox(value) if unbox else value
                return checked(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)

            param._jprune_unchecked = True
            Scope.param = param
    outer = getattr(_UNCHECKED_HERE, "on", False)
    _UNCHECKED_HERE.on = True
    try:
        yield
    finally:
        _UNCHECKED_HERE.on = outer


def _layout(groups, sizes=None, chosen=()):
    """Every group of width > 1 as a set of ``(path, axis, positions)``; with ``chosen`` (pairs
    ``(group, r)``): as ``shrink`` would leave it, the last ``r`` channels of each group removed."""
    sizes = sizes or groups.shapes
    index = {p: i for i, p in enumerate(groups.paths)}
    gone: dict = {}
    fewer = {g.id: r for g, r in chosen}
    for g, r in chosen:
        for m in g.members:
            pos = m.positions(groups.shapes[index[m.path]][m.axis])[-r:]
            gone.setdefault((m.path, m.axis), []).extend(pos.ravel().tolist())
    out = set()
    for g in groups:
        width = g.width - fewer.get(g.id, 0)
        if width < 2:
            continue
        key = []
        for m in g.members:
            pos = m.positions(sizes[index[m.path]][m.axis])[:width]
            if m.index is not None and g.id in fewer:
                pos = m.index[:width]
            drop = np.unique(np.asarray(gone.get((m.path, m.axis), []), int))
            rows = tuple(
                tuple(sorted((p - np.searchsorted(drop, p)).tolist() for p in row if p not in drop))
                for row in pos.tolist()
            )
            key.append((m.path, m.axis, rows))
        out.add(frozenset(key))
    return out


def _moved(groups: Groups, chosen, closed, shapes) -> str | None:
    """Whether the program traced at the smaller widths places the remaining channels where
    ``shrink`` puts them (a reshape with a hard-coded size, ``x.reshape(b, 4, -1)``, does not)."""
    try:
        smaller = _collect(_analyze(closed, len(groups.paths)), groups.paths, shapes, groups.treedef, None)
    except Exception as e:  # noqa: BLE001 - a program the analysis cannot read there: refuse
        return f"the analysis fails at a smaller width ({type(e).__name__})"
    want = _layout(groups, chosen=chosen)
    got = _layout(smaller)
    if want <= got:
        return None
    return (
        "at a smaller width the program lays the channels out differently (a reshape with a fixed "
        "size, such as x.reshape(b, heads, -1)?)"
    )


def _difference(a, b) -> str | None:
    """Where two traces of the program differ other than in shapes (literals, equations)."""
    ja, jb = a.jaxpr, b.jaxpr
    for ca, cb in zip(a.consts, b.consts):
        if np.shape(ca) == np.shape(cb) and not np.array_equal(np.asarray(ca), np.asarray(cb)):
            return "a captured constant changes"
    if len(ja.eqns) != len(jb.eqns):
        return f"the program has {len(jb.eqns)} equations instead of {len(ja.eqns)}"
    for ea, eb in zip(ja.eqns, jb.eqns):
        if ea.primitive is not eb.primitive:
            return f"{eb.primitive.name} where {ea.primitive.name} was"
        for va, vb in zip(ea.invars, eb.invars):
            if isinstance(va, jcore.Literal) != isinstance(vb, jcore.Literal):
                return f"an operand of {ea.primitive.name} changes"
            if isinstance(va, jcore.Literal) and not np.array_equal(np.asarray(va.val), np.asarray(vb.val)):
                return f"the literal {va.val} of {ea.primitive.name}{_where(ea)} becomes {vb.val}"
        for key, pa in ea.params.items():
            pb = eb.params.get(key)
            if isinstance(pa, jcore.ClosedJaxpr | jcore.Jaxpr):
                wrap = (
                    (lambda j: j)
                    if isinstance(pa, jcore.ClosedJaxpr)
                    else (lambda j: jcore.ClosedJaxpr(j, ()))
                )
                d = _difference(wrap(pa), wrap(pb))
                if d:
                    return d
    return None


def _collect(an, paths, shapes, treedef, program):
    found = []
    for r in range(len(an.parent)):
        if an.find(r) != r or r in an.alias or not an.members[r]:
            continue
        seen, members = set(), []
        for leaf, axis, pos in an.members[r]:
            full = shapes[leaf][axis] == pos.shape[0] if pos is not None else True
            if (
                full
                and pos is not None
                and pos.shape[1] == 1
                and np.array_equal(pos[:, 0], np.arange(pos.shape[0]))
            ):
                pos = None
            key = (leaf, axis, None if pos is None else pos.tobytes())
            if key in seen:
                continue
            seen.add(key)
            roles = an.roles.get((leaf, axis), set())
            role = "in" if "in" in roles else "out" if "out" in roles else ""
            members.append((leaf, axis, Member(paths[leaf], axis, pos, role)))
        members.sort(key=lambda m: (m[0], m[1]))
        reason = an.reason[r]
        if reason is None and not any(m.role == "in" for _, _, m in members):
            reason = "no parameter consumes it (no kernel contracts these channels)"
        found.append(
            (
                members[0][0],
                members[0][1],
                an.width[r],
                tuple(m for *_, m in members),
                reason,
                an.varies.get(r),
            )
        )
    found.sort(key=lambda f: (f[0], f[1]))
    groups = [Group(i, w, ms, reason, varies) for i, (_, _, w, ms, reason, varies) in enumerate(found)]
    return Groups(groups, paths, shapes, treedef, program, an.consumers, an.bias)
