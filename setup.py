"""Metadata and entry points are in setup.cfg; this file only declares the optional C
extension (the PII recognizers' one-pass scan). Without a C compiler the install goes on
without it and `llmproxy.pii.recognizers` uses its Python equivalent."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("llmproxy.pii._scan", ["llmproxy/pii/_scan.c"], optional=True)])
