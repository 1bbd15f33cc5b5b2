"""Credentials for TURN: nonces, user stores, TURN REST secrets."""

from .nonce import COOKIE, NonceManager, features_of
from .rest import RestSecrets, rest_expiry, rest_password, rest_username
from .users import (
    Credentials,
    CredentialSource,
    Key,
    RestCredentials,
    SqliteUsers,
    StaticUsers,
    UserRecord,
    random_password,
)

__all__ = [
    "COOKIE",
    "CredentialSource",
    "Credentials",
    "Key",
    "NonceManager",
    "RestCredentials",
    "RestSecrets",
    "SqliteUsers",
    "StaticUsers",
    "UserRecord",
    "features_of",
    "random_password",
    "rest_expiry",
    "rest_password",
    "rest_username",
]
