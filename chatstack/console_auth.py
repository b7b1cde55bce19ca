"""Who may use the admin console: nobody needs to sign in while it listens on loopback only;
anywhere else, every page waits for a sign-in.

The console shows the inference key and starts, stops and changes the server, so it is bound
to 127.0.0.1 by default (.streamlit/config.toml): only someone on this machine reaches it.
When an operator binds it elsewhere (`--server.address 0.0.0.0`, or no address at all, which
makes Streamlit listen on every interface), it asks for a sign-in before it shows anything:

- Streamlit's own `st.login` (OpenID Connect) when `[auth]` is set in .streamlit/secrets.toml;
- else the password in the environment variable CHATSTACK_CONSOLE_PASSWORD;
- with neither, it shows only how to set one of them.
"""

from __future__ import annotations

import hmac
import ipaddress
from enum import Enum

PASSWORD_ENV = "CHATSTACK_CONSOLE_PASSWORD"


class SignIn(Enum):
    NOT_NEEDED = "not needed"      # loopback only
    OIDC = "oidc"                  # st.login
    PASSWORD = "password"          # CHATSTACK_CONSOLE_PASSWORD
    UNCONFIGURED = "unconfigured"  # exposed with no way to sign in: show nothing


def is_loopback(address: str | None) -> bool:
    """Whether a listening address reaches this machine only. Empty means every interface."""
    address = (address or "").strip().strip("[]")
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:   # a host name other than localhost, or empty
        return False


def sign_in_method(address: str | None, env: dict, oidc_configured: bool) -> SignIn:
    if is_loopback(address):
        return SignIn.NOT_NEEDED
    if oidc_configured:
        return SignIn.OIDC
    if env.get(PASSWORD_ENV):
        return SignIn.PASSWORD
    return SignIn.UNCONFIGURED


def password_matches(given: str, expected: str) -> bool:
    """Compared in constant time, so the time taken does not tell how much of it was right."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())
