// Host-side check of csrc/philox.cuh (no GPU needed): for each "seed step counter" line on
// stdin, prints the four Philox4x32-10 words of that counter, the first two uniforms, the
// Gaussian of element `counter` (randn: lane counter % 4 of group counter / 4) and the
// Gaussians of elements counter .. counter + 6 through randn_span (hex floats, exact), so
// that tests/test_cuda_build.py can compare them with fastdia.noise: the integers and the
// uniforms bit for bit, the Gaussians to the rounding of log/sqrt/cos/sin.
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
    std::printf("%u %u %u %u %a %a %a", w.w0, w.w1, w.w2, w.w3,
                static_cast<double>(fastdia::philox::uniform(w.w0)),
                static_cast<double>(fastdia::philox::uniform(w.w1)),
                static_cast<double>(fastdia::philox::randn(key, c)));
    float span[8] = {};
    fastdia::philox::randn_span(key, static_cast<int64_t>(counter), span, 7);
    for (int i = 0; i < 8; ++i) std::printf(" %a", static_cast<double>(span[i]));
    std::printf("\n");
  }
  return 0;
}
