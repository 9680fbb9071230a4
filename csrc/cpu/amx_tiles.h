// AMX tile configuration shared by the tile kernels (augment.cpp, skinny_amx.cpp, rank_amx.cpp).
// The 64-byte TILECFG layout of palette 1: per tile, its rows and its bytes per row.
// Build a TileConfig in the caller's frame and load it there: GCC dropped the stores of a config built in a
// helper and loaded after it returned (seen as a #UD on the first tile instruction).
#pragma once
#include <cstdint>

namespace lowrank::cpu {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

}  // namespace lowrank::cpu
