"""CUDA C sources of gpusaver's kernels, as package data.

This folder is the package ``gpusaver._kernels`` (a package-dir mapping in pyproject.toml), so
wheels carry the ``.cu`` files as ``gpusaver/_kernels/*.cu`` and editable installs map the
package here; ``gpusaver.staging.cuda.kernels`` reads them with ``importlib.resources``.
"""
