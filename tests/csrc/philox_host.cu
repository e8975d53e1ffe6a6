// Host-side check of csrc/philox.cuh (no GPU needed): for each "seed step counter" line on
// stdin, prints the four Philox4x32-10 words, the two uniforms and the Gaussian (hex floats,
// exact), so that tests/test_cuda_build.py can compare them with fastdia.noise: the integers
// and the uniforms bit for bit, the Gaussian to the rounding of log/sqrt/cos.
#include <cstdio>

#include "philox.cuh"

int main() {
  long long seed = 0;
  long long step = 0;
  unsigned long long counter = 0;
  while (std::scanf("%lld %lld %llu", &seed, &step, &counter) == 3) {
    const uint64_t key = fastdia::philox::make_key(seed, step);
    const auto c = static_cast<uint32_t>(counter);
    const fastdia::philox::Words w = fastdia::philox::randint4x(key, c);
    std::printf("%u %u %u %u %a %a %a\n", w.w0, w.w1, w.w2, w.w3,
                static_cast<double>(fastdia::philox::uniform(w.w0)),
                static_cast<double>(fastdia::philox::uniform(w.w1)),
                static_cast<double>(fastdia::philox::randn(key, c)));
  }
  return 0;
}
