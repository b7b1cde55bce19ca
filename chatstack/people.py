"""Who is chatting: a person signed in through Streamlit's own OpenID Connect sign-in
(`st.login`), where the app's secrets configure it, else the one user of single-user mode.

Plain Python: the page passes in its secrets and `st.user`'s claims.
"""

from __future__ import annotations

from collections.abc import Mapping

from chatstack.conversations import LOCAL_USER


def sign_in_configured(secrets: Mapping) -> bool:
    """Streamlit's sign-in needs an [auth] section with redirect_uri and cookie_secret, and a
    provider's client_id (in [auth] itself or in a named [auth.<provider>] section)."""
    auth = secrets.get("auth") or {}
    if not (auth.get("redirect_uri") and auth.get("cookie_secret")):
        return False
    return bool(auth.get("client_id")) or bool(providers(secrets))


def providers(secrets: Mapping) -> list[str]:
    """The named providers ([auth.google], [auth.company]...), in the order written."""
    auth = secrets.get("auth") or {}
    return [name for name, value in auth.items() if isinstance(value, Mapping) and value.get("client_id")]


def user_id(claims: Mapping) -> str:
    """A signed-in person's key for their conversations: the identity provider's subject, which
    never changes for a person (an email address can), qualified by the provider that issued it."""
    subject = claims.get("sub")
    if not subject:
        raise ValueError("the identity provider gave no subject (sub) for the signed-in user")
    issuer = claims.get("iss") or "oidc"
    return f"{issuer}|{subject}"


def display_name(claims: Mapping) -> str:
    return str(claims.get("name") or claims.get("email") or claims.get("sub") or "signed in")


__all__ = ["LOCAL_USER", "display_name", "providers", "sign_in_configured", "user_id"]
