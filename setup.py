"""Metadata and entry points are in setup.cfg. This file adds what a static file cannot say:

- the packages, found on disk: the core (`llmproxy/`) and each built-in middleware's own
  package (`middlewares/<name>/`, installed as `llmproxy.middlewares.<name>`), so that a
  middleware is removed by deleting its folder and its entry point, nothing else;
- the optional C extension of the `pii` middleware (the recognizers' one-pass scan), when
  that middleware is there. Without a C compiler the install goes on without it and
  `llmproxy.middlewares.pii.recognizers` uses its Python equivalent.
"""

import os

from setuptools import Extension, find_packages, setup

packages = ["llmproxy"] + [f"llmproxy.{p}" for p in find_packages("llmproxy")]
packages += ["llmproxy.middlewares"] + [f"llmproxy.middlewares.{p}" for p in find_packages("middlewares")]
scan = "middlewares/pii/_scan.c"
extensions = [Extension("llmproxy.middlewares.pii._scan", [scan], optional=True)] if os.path.exists(scan) else []

setup(packages=packages, ext_modules=extensions)
