"""A lowered conv layer's kernel call with its checks done once (issue 15).

``qconv2d_nhwc`` validates the packed weight, scales, bias, activation spec and geometry on
every call: about 30 us of Python per conv on the 2-vCPU VM, as much as a small layer's
kernels. A compiled model calls the same layer with the same constants every time, so
``PreparedConv`` validates them once (through ``qconv2d_nhwc`` itself, on the first call at each
input shape) and later calls at a seen shape go straight to ``conv_nhwc``. Results are the same
function's, so bit-identical.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bitmix.errors import BitmixError
from bitmix.kernels import conv_amx
from bitmix.kernels.conv import conv_geometry
from bitmix.kernels.conv_nhwc import (
    FloatsAndCodesConv,
    ImplicitConv,
    _finish,
    codes_conv,
    conv_nhwc,
    depthwise,
    depthwise_input,
    depthwise_to_codes,
    implicit_conv,
    implicit_route,
)
from bitmix.kernels.gemm_vnni import NO_CLAMP
from bitmix.kernels.matmul import check_activation_spec
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.padded import PaddedCodes
from bitmix.kernels.quant import _step, qconv2d_nhwc
from bitmix.kernels.routing import dispatch


@dataclass(frozen=True, eq=False)
class PreparedConv:
    """One conv layer's constants (``qconv2d_nhwc``'s arguments); call it with float32 ``x``."""

    w: PackedWeight
    w_scales: np.ndarray
    a_step: float
    a_bits: int
    a_signed: bool
    bias: np.ndarray | None
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    _geoms: dict = field(default_factory=dict, repr=False)  # (shape, channels_last) -> geometry, once checked
    _launches: dict = field(default_factory=dict, repr=False)  # (that key, residual?, clamp) -> (settings, launch)
    _links: dict = field(default_factory=dict, repr=False)  # (that key, clamp, next conv) -> (settings, hand-off)
    _routes: dict = field(default_factory=dict, repr=False)  # ``run``'s call signature -> (settings, route, res shape)
    _boths: dict = field(default_factory=dict, repr=False)  # ``run_both``'s call signature -> (settings, hand-off)

    def run(self, x: np.ndarray | PaddedCodes, channels_last: bool, residual: np.ndarray | None, clamp: tuple,
            nxt: PreparedConv | None) -> np.ndarray | PaddedCodes:
        """A lowered layer's call: ``to_codes(x, channels_last, clamp, nxt)`` where ``nxt`` is given, there is no
        residual and it takes codes, else ``self(x, channels_last, residual, clamp)``. Each call signature's route
        is bound once both layers have run at its shapes (``_route``), so later calls skip the lookups, checks and
        hand-off conditions (~15 us of Python a layer, a sixth of a MobileNetV2 forward's glue)."""
        codes = type(x) is PaddedCodes
        key = (x.shape, channels_last, codes, residual is None, clamp, nxt)
        hit = self._routes.get(key)
        if (hit is not None and hit[0] is dispatch.settings
                and (x.owner is self if codes else x.dtype == np.float32 and x.flags.c_contiguous)
                and (residual is None or (residual.dtype == np.float32 and residual.flags.c_contiguous
                                          and residual.shape == hit[2]))):
            return hit[1](x, residual)
        out = self.to_codes(x, channels_last, clamp, nxt) if nxt is not None and residual is None else None
        if out is None:
            out = self(x, channels_last, residual, clamp)
        if hit is None or hit[0] is not dispatch.settings:
            route = self._route(key)
            if route is not None:
                self._routes[key] = route
        return out

    def run_both(self, x: np.ndarray | PaddedCodes, channels_last: bool, residual: np.ndarray | None, clamp: tuple,
                 nxt: PreparedConv) -> tuple[np.ndarray, PaddedCodes | None]:
        """``run`` for a conv whose result feeds ``nxt`` and other ops too (``layout.code_chains``): ``(floats,
        nxt's input codes)`` from one epilogue where the kernels can (``conv_nhwc.FloatsAndCodesConv``: a one-group
        conv on VNNI or the AMX engine into a one-group ``nxt`` on an implicit GEMM, once both ran at these shapes,
        finite scale and bias), else ``(floats, None)``: ``nxt`` then quantizes the floats itself."""
        codes = type(x) is PaddedCodes
        key = (x.shape, channels_last, codes, residual is None, clamp, nxt)
        hit = self._boths.get(key)
        if hit is None or hit[0] is not dispatch.settings:
            geom_key = ((x.shape[0], x.shape[2], x.shape[3], x.shape[1]), True) if codes else (x.shape, channels_last)
            fast = self._geoms.get(geom_key)
            after = None if fast is None else nxt._geoms.get(((x.shape[0], fast[0][9], fast[0][10], self.w.n), True))
            if after is None:  # a layer not checked at these shapes yet: floats, and ask again next time
                return self.run(x, channels_last, residual, clamp, None), None
            hand_off = self._both(geom_key, fast, clamp, nxt, after, residual is not None)
            hit = self._boths[key] = (dispatch.settings, hand_off, (x.shape[0], fast[0][9], fast[0][10], self.w.n))
        if (hit[1] is not None and (x.owner is self if codes else x.dtype == np.float32 and x.flags.c_contiguous)
                and (residual is None or (residual.dtype == np.float32 and residual.flags.c_contiguous
                                          and residual.shape == hit[2]))):
            return hit[1](x, residual)
        return self.run(x, channels_last, residual, clamp, None), None

    def _both(self, key: tuple, fast: tuple, clamp: tuple, nxt: PreparedConv, after: tuple,
              residual: bool) -> FloatsAndCodesConv | None:
        """``run_both``'s hand-off for these shapes under the dispatch settings in force, or None (floats alone)."""
        geom, _, _, _, _, scale = fast
        g, qstep, qlo, qhi, qshift, _ = after
        if geom[8] != 1 or g[8] != 1 or not np.isfinite(scale).all() or (
                self.bias is not None and not np.isfinite(self.bias).all()):
            return None
        route = implicit_route(nxt.w, key[0][0] * g[9] * g[10], g)
        own = self._implicit(key, fast, residual, clamp)
        # AVX2 has no such epilogue: there it cost more than the pass it saves (resnet50, avx2 forced on Sapphire
        # Rapids, one process in turns: 31.9 -> 32.8 ms)
        if route is None or own is None or not hasattr(own.engine, "conv_both_gemm"):
            return None
        return codes_conv(own, self.w, geom, scale, self.bias, clamp, (qstep, qlo, qhi, qshift, g[4], g[5]), nxt,
                          sums=route is not conv_amx, floats=True, residual=residual)

    def _route(self, key: tuple) -> tuple | None:
        """``run``'s route for this call signature under the dispatch settings in force, as ``(settings, fn(x,
        residual), residual shape)``, or None while it is not settled (a shape not checked yet, a hand-off whose
        next conv has not run at its shapes) or not worth binding (the checked NCHW route, an error)."""
        shape, channels_last, codes, no_residual, clamp, nxt = key
        geom_key = ((shape[0], shape[2], shape[3], shape[1]), True) if codes else (shape, channels_last)
        fast = self._geoms.get(geom_key)
        if fast is None:
            return None
        settings = dispatch.settings
        geom, step, lo, hi, shift, scale = fast
        if nxt is not None and no_residual:
            link = self._links.get((geom_key, clamp, nxt))
            if link is None or link[0] is not settings:
                return None
            if link[1] is not None:
                hand_off = link[1]
                return settings, lambda x, _: hand_off(x), None
        res_shape = (shape[0], geom[9], geom[10], self.w.n)
        if codes and geom[8] != 1:
            w, bias = self.w, self.bias
            return settings, lambda x, r: depthwise(depthwise_input(x, True, step, lo, hi), w, geom, lo, hi, scale,
                                                    bias, r, clamp), res_shape
        launch = self._implicit(geom_key, fast, not no_residual, clamp) if geom[8] == 1 else None
        if codes:
            if launch is None:
                return None
            return settings, lambda x, r: launch.on_codes(x.a8, x.psum, r), res_shape
        if launch is not None:
            return settings, launch, res_shape
        w, bias = self.w, self.bias
        return settings, lambda x, r: conv_nhwc(x, w, geom, step, lo, hi, shift, scale, bias, channels_last, r,
                                                clamp), res_shape

    def __call__(self, x: np.ndarray, channels_last: bool, residual: np.ndarray | None = None,
                 clamp: tuple = NO_CLAMP) -> np.ndarray:
        """``qconv2d_nhwc(x, ..., channels_last=channels_last)``, then ``+ residual`` (C-contiguous float32,
        the output's NHWC shape) and clamped to float32 ``clamp = (lo, hi)``, in the kernel's epilogue."""
        if isinstance(x, PaddedCodes):
            return self._from_codes(x, residual, clamp)
        key = (x.shape, channels_last)
        fast = self._geoms.get(key)
        if fast is not None and x.dtype == np.float32 and x.flags.c_contiguous and (
                residual is None or (residual.dtype == np.float32 and residual.flags.c_contiguous
                                     and residual.shape == (x.shape[0], fast[0][9], fast[0][10], self.w.n))):
            launch = self._implicit(key, fast, residual is not None, clamp)
            if launch is not None:
                return launch(x, residual)
            geom, step, lo, hi, shift, scale = fast
            return conv_nhwc(x, self.w, geom, step, lo, hi, shift, scale, self.bias, channels_last, residual, clamp)
        y = qconv2d_nhwc(x, self.w, self.w_scales, self.a_step, self.a_bits, self.a_signed, self.bias,
                         self.kernel_size, self.stride, self.padding, self.dilation, self.groups, channels_last)
        if residual is not None and (residual.shape != y.shape or residual.dtype != np.float32):
            raise BitmixError(f"residual: expected float32 {y.shape} (the conv's NHWC output), got "
                              f"{residual.dtype} {residual.shape}")
        y = _finish(y, residual, clamp)
        nchw = x.transpose(0, 3, 1, 2).shape if channels_last else x.shape
        geom = conv_geometry(nchw, self.w, self.kernel_size, self.stride, self.padding, self.dilation, self.groups)
        if nchw[0] and (geom[8] == 1 or geom[8] == nchw[1] == self.w.n):  # the shapes ``conv_nhwc`` takes itself
            lo, hi, shift = check_activation_spec(self.a_bits, self.a_signed)
            step = _step(self.a_step)
            self._geoms[key] = (geom, step, lo, hi, shift, step * self.w_scales)
        return y

    def _implicit(self, key: tuple, fast: tuple, residual: bool, clamp: tuple) -> ImplicitConv | None:
        """This shape's bound implicit-GEMM launch under the dispatch settings in force (built at the first
        call with them), or None where the conv takes another route."""
        settings = dispatch.settings
        hit = self._launches.get((key, residual, clamp))
        if hit is not None and hit[0] is settings:
            return hit[1]
        geom, step, lo, hi, shift, scale = fast
        implicit = implicit_route(self.w, key[0][0] * geom[9] * geom[10], geom) if geom[8] == 1 else None
        launch = None if implicit is None else implicit_conv(implicit, key[0], key[1], self.w, geom, step, lo, hi,
                                                             shift, scale, self.bias, residual, clamp)
        self._launches[(key, residual, clamp)] = (settings, launch)
        return launch

    def to_codes(self, x: np.ndarray | PaddedCodes, channels_last: bool, clamp: tuple,
                 nxt: PreparedConv) -> PaddedCodes | None:
        """This conv's output as ``nxt``'s input codes, or None (the caller runs the float path): a depthwise
        conv quantizes in its epilogue (``conv_nhwc.depthwise_to_codes``) for a one-group ``nxt`` on the
        implicit GEMM, a one-group conv on the implicit GEMM (VNNI or AVX2) in its GEMM's (``conv_nhwc.CodesConv``)
        for a one-group ``nxt`` on the implicit GEMM or a depthwise one; the input may be codes itself. Only once
        both layers ran at these shapes (checks done) and this layer's scale and bias are finite (no NaN to catch)."""
        if isinstance(x, PaddedCodes):
            nb, c, h, w = x.shape
            key = ((nb, h, w, c), True)
        elif x.dtype == np.float32 and x.flags.c_contiguous:
            key = (x.shape, channels_last)
        else:
            return None
        fast = self._geoms.get(key)
        if fast is None or (isinstance(x, PaddedCodes) and x.owner is not self):
            return None
        link = self._link(key, fast, channels_last, clamp, nxt)
        return None if link is None else link(x)

    def _link(self, key: tuple, fast: tuple, channels_last: bool, clamp: tuple,
              nxt: PreparedConv) -> Callable[[np.ndarray | PaddedCodes], PaddedCodes] | None:
        """This shape's bound code hand-off into ``nxt`` under the dispatch settings in force (``to_codes``'
        conditions checked once, when both layers have run at these shapes), or None."""
        settings = dispatch.settings
        hit = self._links.get((key, clamp, nxt))
        if hit is not None and hit[0] is settings:
            return hit[1]
        geom, step, lo, hi, _, scale = fast
        after = nxt._geoms.get(((key[0][0], geom[9], geom[10], self.w.n), True))
        if after is None:  # the next conv has not run at this shape yet: ask again next time
            return None
        g, qstep, qlo, qhi, qshift, _ = after
        route = implicit_route(nxt.w, key[0][0] * g[9] * g[10], g) if g[8] == 1 else None
        into_gemm = route is not None
        finite = np.isfinite(scale).all() and (self.bias is None or np.isfinite(self.bias).all())
        link = None
        if finite and geom[8] != 1 and into_gemm:  # depthwise -> its epilogue quantizes for the GEMM
            quant = (qstep, qlo, qhi, qshift, g[4], g[5])
            link = functools.partial(_depthwise_link, self, channels_last, fast, clamp, quant, nxt)
        elif finite and geom[8] == 1 and (into_gemm or g[8] != 1):  # one group -> the GEMM's CODES epilogue
            own = self._implicit(key, fast, False, clamp)
            if own is not None:
                quant = (qstep, qlo, qhi, qshift, g[4], g[5]) if into_gemm else (qstep, qlo, qhi, 0, 0, 0)
                link = codes_conv(own, self.w, geom, scale, self.bias, clamp, quant, nxt, depthwise=not into_gemm,
                                  sums=route is not conv_amx)
        self._links[(key, clamp, nxt)] = (settings, link)
        return link

    def _from_codes(self, codes: PaddedCodes, residual: np.ndarray | None, clamp: tuple) -> np.ndarray:
        nb, c, h, w = codes.shape
        fast = self._geoms.get(((nb, h, w, c), True))
        if codes.owner is not self or fast is None:
            raise BitmixError("x: codes quantized for another layer; pass the float activations")
        geom, step, lo, hi, shift, scale = fast
        if residual is not None and (residual.dtype != np.float32 or not residual.flags.c_contiguous
                                     or residual.shape != (nb, geom[9], geom[10], self.w.n)):
            raise BitmixError(f"residual: expected C-contiguous float32 {(nb, geom[9], geom[10], self.w.n)}, got "
                              f"{residual.dtype} {residual.shape}")
        if geom[8] != 1:
            return depthwise(depthwise_input(codes, True, step, lo, hi), self.w, geom, lo, hi, scale, self.bias,
                             residual, clamp)
        launch = self._implicit(((nb, h, w, c), True), fast, residual is not None, clamp)
        if launch is None:
            raise BitmixError("x: codes for the implicit GEMM, but this conv runs on another path; pass floats")
        return launch.on_codes(codes.a8, codes.psum, residual)


def _depthwise_link(conv: PreparedConv, channels_last: bool, fast: tuple, clamp: tuple, quant: tuple,
                    nxt: PreparedConv, x: np.ndarray | PaddedCodes) -> PaddedCodes:
    """``conv`` (depthwise) on floats or its input codes, quantizing for ``nxt`` (``PreparedConv._link``)."""
    geom, step, lo, hi, _, scale = fast
    return depthwise_to_codes(depthwise_input(x, channels_last, step, lo, hi), conv.w, geom, lo, hi, scale, conv.bias,
                              clamp, quant, nxt)
