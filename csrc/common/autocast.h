// Autocast (torch.autocast) rules for the lowrank ops: the op runs in the autocast region's lower-precision dtype,
// as ATen's own F.linear does (its "lower_precision_fp" policy): every eligible floating tensor argument (on the
// region's device, not fp64) is cast with at::autocast::cached_cast, so frozen fp32 leaf weights are cast once per
// region and reused, and gradients flow back through the casts to fp32 parameters. Tensors already in that dtype
// pass through unchanged (LoRALinear's packed bf16 [W | B] views keep their layout). Integer tensors (indices,
// segment tables) and fp64 tensors are never cast.
#pragma once
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>

namespace lowrank::autocast {

inline at::Tensor cast(at::ScalarType dt, c10::DeviceType dev, const at::Tensor& t) {
  return at::autocast::cached_cast(dt, t, dev);
}
inline std::optional<at::Tensor> cast(at::ScalarType dt, c10::DeviceType dev, const std::optional<at::Tensor>& t) {
  return at::autocast::cached_cast(dt, t, dev);
}
template <class T>
inline const T& cast(at::ScalarType, c10::DeviceType, const T& v) {
  return v;
}

// Inside an op's autocast kernel: autocast is off for the rest of the scope (the op below runs on the casts), and
// region(t) casts one argument. Each kernel names the arguments to cast: weights and activations, not the
// per-adapter scaling or other small fp32/fp64 parameters whose precision the op relies on.
template <c10::DeviceType Dev>
struct Region {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{at::autocast::get_autocast_dispatch_key_from_device_type(Dev)};
  at::ScalarType dtype = at::autocast::get_autocast_dtype(Dev);
  template <class T>
  decltype(auto) operator()(const T& v) const {
    return cast(dtype, Dev, v);
  }
};

}  // namespace lowrank::autocast
