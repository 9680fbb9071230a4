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

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

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
// region(t) casts one argument. Each rule names the arguments to cast: weights and activations, not the
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

// The argument positions an op's rule casts, as a bit mask for Rule: positions({0, 1, 3}).
constexpr uint64_t positions(std::initializer_list<int> args) {
  uint64_t mask = 0;
  for (const int i : args) mask |= uint64_t{1} << i;
  return mask;
}

// One op's autocast kernel: casts the arguments whose bit is set in Mask (bit i: argument i) and calls the op
// Name (a namespace-scope constexpr char array, e.g. "lowrank::lora_linear") with autocast off. Registered as
//   m.impl("lora_linear", &autocast::Rule<c10::DeviceType::CPU, kName, kMask, Sig>::call);
template <c10::DeviceType Dev, const char* Name, uint64_t Mask, class Sig>
struct Rule;

template <c10::DeviceType Dev, const char* Name, uint64_t Mask, class R, class... A>
struct Rule<Dev, Name, Mask, R(A...)> {
  static R call(A... args) { return call_with(std::index_sequence_for<A...>{}, args...); }

 private:
  template <size_t... I>
  static R call_with(std::index_sequence<I...>, A... args) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").template typed<R(A...)>();
    const Region<Dev> c;
    return op.call(arg<((Mask >> I) & 1) != 0>(c, args)...);
  }
  template <bool Cast, class T>
  static decltype(auto) arg(const Region<Dev>& c, const T& v) {
    if constexpr (Cast) {
      return c(v);
    } else {
      return (v);
    }
  }
};

}  // namespace lowrank::autocast
