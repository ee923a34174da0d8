// llama-mtp shim: how every extern "C" entry point reports failure.
//
// Each entry runs its body inside guarded(): a failure (fail(), a C++ exception from
// upstream, anything thrown) becomes a status code plus a per-thread last error, so
// nothing unwinds into C or Python.

#pragma once

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>

extern "C" {
#include "../mtp_cdef.h"
}

#if defined(_WIN32)
#define MTP_EXPORT extern "C" __declspec(dllexport)
#else
#define MTP_EXPORT extern "C" __attribute__((visibility("default")))
#endif

// one per thread, shared by every translation unit of the shim (C++17 inline variable)
inline thread_local std::string g_last_error;

struct mtp_failure {
    int32_t     status;
    std::string message;
};

[[noreturn]] inline void fail(int32_t status, const char * fmt, ...) {
    char buf[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    throw mtp_failure{status, buf};
}

// Turn any failure inside an entry point into a status code + last error. Upstream's own
// exceptions count as internal errors unless `exception_status` says they come from the
// caller's input (the chat entry points, whose only input is the request).
template <typename F>
int32_t guarded(F && body, int32_t exception_status = MTP_ERR_INTERNAL) {
    try {
        body();
        g_last_error.clear();
        return MTP_OK;
    } catch (const mtp_failure & f) {
        g_last_error = f.message;
        return f.status;
    } catch (const std::bad_alloc & e) {
        g_last_error = std::string("internal error: out of memory: ") + e.what();
        return MTP_ERR_INTERNAL;
    } catch (const std::exception & e) {
        g_last_error = exception_status == MTP_ERR_INTERNAL ? std::string("internal error: ") + e.what() : e.what();
        return exception_status;
    } catch (...) {
        g_last_error = "internal error: unknown C++ exception";
        return MTP_ERR_INTERNAL;
    }
}
