// Included right after a `#pragma GCC target` that enables at least AVX2 + FMA + F16C.
// g++ does not define the ISA macros for a target pragma, and at::vec's headers (sleef.h) test them.
#pragma once

#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
// Lambdas inside at::vec's headers trip a note about the AVX calling convention; they are inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
