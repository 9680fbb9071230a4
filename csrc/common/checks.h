// Argument checks shared by every kernel. Python wrappers raise ValueError/TypeError first with friendlier
// text; these keep direct torch.ops.lowrank callers from reaching a kernel with bad input.
#pragma once
#include <ATen/ATen.h>

#define LOWRANK_CHECK_DIM(t, d, name) \
  TORCH_CHECK_VALUE((t).dim() == (d), name " must be ", d, "-D, got shape ", (t).sizes())

#define LOWRANK_CHECK_SAME_DTYPE(t, ref, name, refname)                                            \
  TORCH_CHECK_TYPE((t).scalar_type() == (ref).scalar_type(), name " has dtype ", (t).scalar_type(), \
                   " but " refname " has dtype ", (ref).scalar_type())

#define LOWRANK_CHECK_SAME_DEVICE(t, ref, name, refname)                                                \
  TORCH_CHECK_VALUE((t).device() == (ref).device(), name " is on ", (t).device(), " but " refname " is on ", \
                    (ref).device())

#define LOWRANK_CHECK_FLOATING(t, name)                                                      \
  TORCH_CHECK_TYPE(at::isFloatingType((t).scalar_type()), name " must be a floating tensor, got ", \
                   (t).scalar_type())
