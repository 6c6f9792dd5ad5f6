"""A real LiteRT external delegate, built here with the C compiler: it takes no node (so the
model runs on LiteRT's CPU kernels) and counts the interpreters that prepared with it. It
stands in for a vendor's delegate (Edge TPU, VX) on a machine without that hardware, so
the agent's delegate path runs for real: library loaded, handed to the interpreter, used."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
/* TfLiteDelegate from tensorflow/lite/core/c/common.h */
typedef struct TfLiteDelegate {
  void* data_;
  int (*Prepare)(void* context, struct TfLiteDelegate* delegate);
  int (*CopyFromBufferHandle)(void*, struct TfLiteDelegate*, int, void*);
  int (*CopyToBufferHandle)(void*, struct TfLiteDelegate*, int, void*);
  void (*FreeBufferHandle)(void*, struct TfLiteDelegate*, int*);
  int64_t flags;
  void* opaque_delegate_builder;
} TfLiteDelegate;
int prepared = 0;
static int prepare(void* context, TfLiteDelegate* delegate) { prepared++; return 0; }
TfLiteDelegate* tflite_plugin_create_delegate(char** keys, char** values, size_t n,
                                              void (*report_error)(const char*)) {
  TfLiteDelegate* delegate = calloc(1, sizeof(TfLiteDelegate));
  delegate->Prepare = prepare;
  return delegate;
}
void tflite_plugin_destroy_delegate(TfLiteDelegate* delegate) { free(delegate); }
"""


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def null_delegate(folder: Path) -> Path:
    source, library = folder / "null_delegate.c", folder / "libnull_delegate.so"
    source.write_text(SOURCE)
    cc = compiler()
    assert cc is not None
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60)
    return library


def prepared(library: Path) -> int:
    """How many interpreters prepared with the delegate in this process."""
    return ctypes.c_int.in_dll(ctypes.CDLL(str(library)), "prepared").value
