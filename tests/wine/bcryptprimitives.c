/* A stand-in for Windows' bcryptprimitives.dll under wine 8 (Debian bookworm), which lacks it.
 * Rust's standard library (1.78 and later) takes its random numbers from ProcessPrng there;
 * Windows 10 and later have the DLL. Only the wine tests use this: lucidgate.exe ships without
 * it. Built by scripts/test-windows with mingw-w64 and put beside the tested copy of the .exe. */
#include <windows.h>
#include <bcrypt.h>

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    return BCryptGenRandom(NULL, data, (ULONG)len, BCRYPT_USE_SYSTEM_PREFERRED_RNG) == 0;
}
