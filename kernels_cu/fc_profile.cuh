// flashcomm: every profiling and occupancy-experiment hook of the kernels, in one place.
//
// None of these is defined by the product build (flashcomm_cupy/_kernels.py);
// benchmarks pass them with -D (benchmarks/kernel_variants.py,
// benchmarks/kernel_solo.py --define-sets).  The hooks below turn them into
// compile-time constants, so the production code reads `if constexpr` and a
// build without them compiles to exactly what it would without the hook.
//   FC_PROFILE_NO_WAIT     skip every wait for peers (fc_wait_peers, fc_ll_poll): wrong results
//   FC_PROFILE_LOCAL_DATA  payload stores stay in this rank's workspace (fc_slot): no NVLink
//                          payload, wrong results
//   FC_PROFILE_LL_NO_POISON_READ  the LL kernels skip the start-time poison read (fc_ll_begin)
//   FC_PROFILE_LL_NO_FAIL_PATH    the LL kernels' end is a plain barrier: no vote, no NaN fill,
//                          no record (fc_ll_end); with the one above, what the poison protocol
//                          costs the LL kernels (benchmarks/NOTES.md v24)
//   FC_PROFILE_ROT_TIMES=N every Hadamard rotation runs its butterflies N times (a loop, so the
//                          code does not grow): wrong results; against N = 1, what a rotation's
//                          arithmetic costs a call, apart from whatever it costs once per call
//   FC_TWOSHOT_THREADS / FC_TWOSHOT_MINB
//                          the flag two-shot's launch bounds, e.g. 256 and 3 for three
//                          256-thread blocks per SM (benchmarks/NOTES.md)
#pragma once

#ifdef FC_PROFILE_NO_WAIT
#define FC_PROFILE_SKIPS_WAITS true
#else
#define FC_PROFILE_SKIPS_WAITS false
#endif

#ifdef FC_PROFILE_LOCAL_DATA
#define FC_PROFILE_KEEPS_DATA_LOCAL true
#else
#define FC_PROFILE_KEEPS_DATA_LOCAL false
#endif

#ifdef FC_PROFILE_LL_NO_POISON_READ
#define FC_PROFILE_LL_SKIPS_POISON_READ true
#else
#define FC_PROFILE_LL_SKIPS_POISON_READ false
#endif

#ifdef FC_PROFILE_LL_NO_FAIL_PATH
#define FC_PROFILE_LL_SKIPS_FAIL_PATH true
#else
#define FC_PROFILE_LL_SKIPS_FAIL_PATH false
#endif

#ifndef FC_PROFILE_ROT_TIMES
#define FC_PROFILE_ROT_TIMES 1
#endif

// The flag two-shot's launch bounds (the product's: 512 threads).
#ifdef FC_TWOSHOT_MINB
#define FC_TWOSHOT_BOUNDS __launch_bounds__(FC_TWOSHOT_THREADS, FC_TWOSHOT_MINB)
#else
#define FC_TWOSHOT_BOUNDS __launch_bounds__(512)
#endif
