// AMX tile configuration shared by the tile kernels (augment.cpp, skinny_amx.cpp, rank_amx.cpp).
// The 64-byte TILECFG layout of palette 1: per tile, its rows and its bytes per row.
// Build a TileConfig in the caller's frame and load it there: GCC dropped the stores of a config built in a
// helper and loaded after it returned (seen as a #UD on the first tile instruction).
#pragma once
#include <cstdint>
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#endif

namespace lowrank::cpu {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
// Palette 1 with the first eight tiles all 16 rows × 64 bytes (16×16 fp32 C, 16×32 bf16 A, 16 pairs × 16 B),
// built and loaded in this one frame (see above).
__attribute__((target("amx-tile"))) inline void load_uniform_tile_config(TileConfig& cfg) {
  cfg = TileConfig{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}
#endif

}  // namespace lowrank::cpu
