"""Files shipped beside the modules, read the same way from the source tree and from sambaproxy.pyz.

Inside the archive nothing can be opened by path, so every read goes through the
module loader (a file loader here, a zipimporter in the archive); nothing is ever
extracted or written next to the archive.
"""

from __future__ import annotations

import importlib.util
import os
import ssl


def read_resource(name: str) -> bytes:
    """A file beside these modules (status.html), read through this module's loader."""
    return __loader__.get_data(os.path.join(os.path.dirname(__file__), name))


def ca_bundle() -> bytes:
    """certifi's cacert.pem, found without importing certifi: its where() extracts a temporary
    file when certifi lives in a zip, and its import pulls in importlib.resources."""
    spec = importlib.util.find_spec("certifi")
    if spec is None or spec.origin is None:
        raise RuntimeError("certifi is not installed: it provides the CA bundle for HTTPS upstream")
    return spec.loader.get_data(os.path.join(os.path.dirname(spec.origin), "cacert.pem"))


def outbound_ssl_context(environ: dict[str, str]) -> ssl.SSLContext:
    """Certificate checks as httpx makes them by default: SSL_CERT_FILE, else SSL_CERT_DIR, else
    certifi's bundle, loaded from its bytes. One context serves every outbound connection."""
    if environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=environ["SSL_CERT_FILE"])
    if environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=environ["SSL_CERT_DIR"])
    # PEM is ASCII; "ignore" only drops non-ASCII letters of the bundle's comment lines.
    return ssl.create_default_context(cadata=ca_bundle().decode("ascii", "ignore"))
