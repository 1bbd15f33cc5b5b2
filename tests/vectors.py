"""Byte-exact STUN test vectors from RFC 5769 and RFC 8489 Appendix B.1.

Every message below is written out the way its RFC figure lays it out: one
4-byte row per line, with the figure's annotation as the comment. The inputs
each vector was built from (passwords, usernames, realms, nonces, addresses)
are named constants next to it.

The RFC 8489 Appendix B.1 message is the one corrected by verified erratum
6268, not the one printed in the RFC: the printed one is kept as well, under a
name that says so, for tests that want a message that must be rejected.

Each vector was checked independently of this project with hashlib, hmac and
zlib only: MESSAGE-INTEGRITY(-SHA256) recomputed over the message up to the
attribute, with the header length pointing at the end of that attribute;
FINGERPRINT recomputed as CRC-32 XOR 0x5354554E; XOR-MAPPED-ADDRESS decoded
back to the stated address; USERHASH and the long-term keys recomputed from
their formulas. The derived values (keys, HMACs, CRCs) are given as constants
too, so a test can check one step at a time.
"""

# ---------------------------------------------------------------------------
# RFC 5769, values shared by sections 2.1 to 2.3
# ---------------------------------------------------------------------------

# Short-term password of sections 2.1, 2.2 and 2.3. With the short-term
# mechanism the HMAC key is the password itself (RFC 8489 section 9.1.1).
RFC5769_SHORT_TERM_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"

# Transaction ID shared by sections 2.1, 2.2 and 2.3.
RFC5769_TRANSACTION_ID = bytes.fromhex("b7e7a701bc34d686fa87dfae")

# ---------------------------------------------------------------------------
# RFC 5769 section 2.1: Sample Request
# Source: https://www.rfc-editor.org/rfc/rfc5769#section-2.1
# ---------------------------------------------------------------------------

RFC5769_REQUEST_SOFTWARE = "STUN test client"
RFC5769_REQUEST_USERNAME = "evtj:h6vY"
RFC5769_REQUEST_PRIORITY = 0x6E0001FF
RFC5769_REQUEST_ICE_CONTROLLED_TIE_BREAKER = 0x932FF9B151263B36

# Note: the USERNAME padding here is three 0x20 (space) bytes, not zeros;
# receivers must ignore padding contents (RFC 8489 section 14).
RFC5769_SAMPLE_REQUEST = bytes.fromhex(
    "00 01 00 58 "  # Request type and message length
    "21 12 a4 42 "  # Magic cookie
    "b7 e7 a7 01 "  # }
    "bc 34 d6 86 "  # }  Transaction ID
    "fa 87 df ae "  # }
    "80 22 00 10 "  # SOFTWARE attribute header
    "53 54 55 4e "  # }
    "20 74 65 73 "  # }  User-agent...
    "74 20 63 6c "  # }  ...name
    "69 65 6e 74 "  # }
    "00 24 00 04 "  # PRIORITY attribute header
    "6e 00 01 ff "  # ICE priority value
    "80 29 00 08 "  # ICE-CONTROLLED attribute header
    "93 2f f9 b1 "  # }  Pseudo-random tie breaker...
    "51 26 3b 36 "  # }   ...for ICE control
    "00 06 00 09 "  # USERNAME attribute header
    "65 76 74 6a "  # }
    "3a 68 36 76 "  # }  Username (9 bytes) and padding (3 bytes)
    "59 20 20 20 "  # }
    "00 08 00 14 "  # MESSAGE-INTEGRITY attribute header
    "9a ea a7 0c "  # }
    "bf d8 cb 56 "  # }
    "78 1e f2 b5 "  # }  HMAC-SHA1 fingerprint
    "b2 d3 f2 49 "  # }
    "c1 b5 71 a2 "  # }
    "80 28 00 04 "  # FINGERPRINT attribute header
    "e5 7a 3b cf"  # CRC32 fingerprint
)
RFC5769_SAMPLE_REQUEST_MESSAGE_INTEGRITY = bytes.fromhex("9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2")
RFC5769_SAMPLE_REQUEST_FINGERPRINT = 0xE57A3BCF

# ---------------------------------------------------------------------------
# RFC 5769 section 2.2: Sample IPv4 Response
# Source: https://www.rfc-editor.org/rfc/rfc5769#section-2.2
# ---------------------------------------------------------------------------

RFC5769_RESPONSE_SOFTWARE = "test vector"
RFC5769_MAPPED_IPV4_ADDRESS = "192.0.2.1"
RFC5769_MAPPED_PORT = 32853  # shared by sections 2.2 and 2.3

RFC5769_SAMPLE_IPV4_RESPONSE = bytes.fromhex(
    "01 01 00 3c "  # Response type and message length
    "21 12 a4 42 "  # Magic cookie
    "b7 e7 a7 01 "  # }
    "bc 34 d6 86 "  # }  Transaction ID
    "fa 87 df ae "  # }
    "80 22 00 0b "  # SOFTWARE attribute header
    "74 65 73 74 "  # }
    "20 76 65 63 "  # }  UTF-8 server name
    "74 6f 72 20 "  # }
    "00 20 00 08 "  # XOR-MAPPED-ADDRESS attribute header
    "00 01 a1 47 "  # Address family (IPv4) and xor'd mapped port number
    "e1 12 a6 43 "  # Xor'd mapped IPv4 address
    "00 08 00 14 "  # MESSAGE-INTEGRITY attribute header
    "2b 91 f5 99 "  # }
    "fd 9e 90 c3 "  # }
    "8c 74 89 f9 "  # }  HMAC-SHA1 fingerprint
    "2a f9 ba 53 "  # }
    "f0 6b e7 d7 "  # }
    "80 28 00 04 "  # FINGERPRINT attribute header
    "c0 7d 4c 96"  # CRC32 fingerprint
)
RFC5769_SAMPLE_IPV4_RESPONSE_MESSAGE_INTEGRITY = bytes.fromhex(
    "2b91f599fd9e90c38c7489f92af9ba53f06be7d7"
)
RFC5769_SAMPLE_IPV4_RESPONSE_FINGERPRINT = 0xC07D4C96

# ---------------------------------------------------------------------------
# RFC 5769 section 2.3: Sample IPv6 Response
# Source: https://www.rfc-editor.org/rfc/rfc5769#section-2.3
# ---------------------------------------------------------------------------

RFC5769_MAPPED_IPV6_ADDRESS = "2001:db8:1234:5678:11:2233:4455:6677"

# The IPv6 X-Address is XORed with the magic cookie followed by the
# transaction ID (RFC 8489 section 14.2).
RFC5769_SAMPLE_IPV6_RESPONSE = bytes.fromhex(
    "01 01 00 48 "  # Response type and message length
    "21 12 a4 42 "  # Magic cookie
    "b7 e7 a7 01 "  # }
    "bc 34 d6 86 "  # }  Transaction ID
    "fa 87 df ae "  # }
    "80 22 00 0b "  # SOFTWARE attribute header
    "74 65 73 74 "  # }
    "20 76 65 63 "  # }  UTF-8 server name
    "74 6f 72 20 "  # }
    "00 20 00 14 "  # XOR-MAPPED-ADDRESS attribute header
    "00 02 a1 47 "  # Address family (IPv6) and xor'd mapped port number
    "01 13 a9 fa "  # }
    "a5 d3 f1 79 "  # }  Xor'd mapped IPv6 address
    "bc 25 f4 b5 "  # }
    "be d2 b9 d9 "  # }
    "00 08 00 14 "  # MESSAGE-INTEGRITY attribute header
    "a3 82 95 4e "  # }
    "4b e6 7b f1 "  # }
    "17 84 c9 7c "  # }  HMAC-SHA1 fingerprint
    "82 92 c2 75 "  # }
    "bf e3 ed 41 "  # }
    "80 28 00 04 "  # FINGERPRINT attribute header
    "c8 fb 0b 4c"  # CRC32 fingerprint
)
RFC5769_SAMPLE_IPV6_RESPONSE_MESSAGE_INTEGRITY = bytes.fromhex(
    "a382954e4be67bf11784c97c8292c275bfe3ed41"
)
RFC5769_SAMPLE_IPV6_RESPONSE_FINGERPRINT = 0xC8FB0B4C

# ---------------------------------------------------------------------------
# RFC 5769 section 2.4: Sample Request with Long-Term Authentication
# Source: https://www.rfc-editor.org/rfc/rfc5769#section-2.4
# ---------------------------------------------------------------------------

# "マトリックス" (U+30DE U+30C8 U+30EA U+30C3 U+30AF U+30B9), 18 bytes of
# UTF-8, unaffected by SASLprep.
RFC5769_LONG_TERM_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
# "The<U+00AD>M<U+00AA>tr<U+2168>" before SASLprep, "TheMatrIX" after it.
# Only the processed form goes into the key.
RFC5769_LONG_TERM_PASSWORD_BEFORE_SASLPREP = "The\u00adM\u00aatr\u2168"
RFC5769_LONG_TERM_PASSWORD = "TheMatrIX"
RFC5769_LONG_TERM_REALM = "example.org"
RFC5769_LONG_TERM_NONCE = "f//499k954d6OL34oL9FSTvy64sA"
RFC5769_LONG_TERM_TRANSACTION_ID = bytes.fromhex("78ad3433c6ad72c029da412e")

# Derived, not printed in the RFC: MD5("username:realm:password") in UTF-8,
# the 16-byte HMAC key of the long-term mechanism (RFC 8489 section 9.2.2).
RFC5769_LONG_TERM_KEY = bytes.fromhex("e8ca7ad59d5eb0518e312911d2dab2a9")

# This message has no FINGERPRINT.
RFC5769_SAMPLE_REQUEST_LONG_TERM = bytes.fromhex(
    "00 01 00 60 "  # Request type and message length
    "21 12 a4 42 "  # Magic cookie
    "78 ad 34 33 "  # }
    "c6 ad 72 c0 "  # }  Transaction ID
    "29 da 41 2e "  # }
    "00 06 00 12 "  # USERNAME attribute header
    "e3 83 9e e3 "  # }
    "83 88 e3 83 "  # }
    "aa e3 83 83 "  # }  Username value (18 bytes) and padding (2 bytes)
    "e3 82 af e3 "  # }
    "82 b9 00 00 "  # }
    "00 15 00 1c "  # NONCE attribute header
    "66 2f 2f 34 "  # }
    "39 39 6b 39 "  # }
    "35 34 64 36 "  # }
    "4f 4c 33 34 "  # }  Nonce value
    "6f 4c 39 46 "  # }
    "53 54 76 79 "  # }
    "36 34 73 41 "  # }
    "00 14 00 0b "  # REALM attribute header
    "65 78 61 6d "  # }
    "70 6c 65 2e "  # }  Realm value (11 bytes) and padding (1 byte)
    "6f 72 67 00 "  # }
    "00 08 00 14 "  # MESSAGE-INTEGRITY attribute header
    "f6 70 24 65 "  # }
    "6d d6 4a 3e "  # }
    "02 b8 e0 71 "  # }  HMAC-SHA1 fingerprint
    "2e 85 c9 a2 "  # }
    "8c a8 96 66"  # }
)
RFC5769_SAMPLE_REQUEST_LONG_TERM_MESSAGE_INTEGRITY = bytes.fromhex(
    "f67024656dd64a3e02b8e0712e85c9a28ca89666"
)

# ---------------------------------------------------------------------------
# RFC 8489 section 9.2.2: worked example of the MD5 long-term key
# Source: https://www.rfc-editor.org/rfc/rfc8489#section-9.2.2
# ---------------------------------------------------------------------------

# "if the username is 'user', the realm is 'realm', and the password is
# 'pass', then the 16-byte HMAC key would be ... 0x8493fbc53ba582fb4c044c456bdc40eb"
RFC8489_KEY_EXAMPLE_USERNAME = "user"
RFC8489_KEY_EXAMPLE_REALM = "realm"
RFC8489_KEY_EXAMPLE_PASSWORD = "pass"
RFC8489_KEY_EXAMPLE_MD5_KEY = bytes.fromhex("8493fbc53ba582fb4c044c456bdc40eb")

# ---------------------------------------------------------------------------
# RFC 8489 Appendix B.1: Sample Request with Long-Term Authentication with
# MESSAGE-INTEGRITY-SHA256 and USERHASH, as corrected by erratum 6268
# Source: https://www.rfc-editor.org/rfc/rfc8489#appendix-B.1
# Erratum: https://www.rfc-editor.org/errata/eid6268 (status: Verified)
#
# What the erratum changed, against the bytes printed in the RFC:
#   1. Message length 0x009c -> 0x0090. The printed 0x9c (156) is the length
#      of the whole message including the 20-byte header; the length field
#      counts the attributes only.
#   2. A PASSWORD-ALGORITHM attribute (type 0x001d, length 4, algorithm
#      0x0002 SHA-256, parameters length 0) is added between REALM and
#      MESSAGE-INTEGRITY-SHA256. The printed message said nothing of the
#      algorithm; without PASSWORD-ALGORITHM the key is the default MD5 one
#      (RFC 8489 section 9.2.2), yet the example uses the SHA-256 key.
#   3. The MESSAGE-INTEGRITY-SHA256 value is recomputed over the new message.
#   USERHASH, NONCE and REALM are unchanged. The corrected message is 164
#   bytes (20 + 0x90); the printed one was 156 bytes.
#
# Found while checking: the printed HMAC (e4 68 6c 8f ...) is HMAC-SHA256
# with the SHA-256 key below over the printed bytes with the length field
# left at 0x9c. It does not verify with the length set to 0x88 (the length up
# to the end of MESSAGE-INTEGRITY-SHA256), with either key.
# ---------------------------------------------------------------------------

# Same username and password as RFC 5769 section 2.4, this time processed
# with the OpaqueString profile (RFC 8265) rather than SASLprep; the result is
# the same.
RFC8489_B1_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
RFC8489_B1_PASSWORD_BEFORE_OPAQUESTRING = "The\u00adM\u00aatr\u2168"
RFC8489_B1_PASSWORD = "TheMatrIX"
RFC8489_B1_REALM = "example.org"
# "obMatJos2" + "AAAC" (the nonce cookie) + the RFC 5769 nonce. "AAAC" is the
# base64 of the 3-byte STUN Security Features 00 00 02.
RFC8489_B1_NONCE = "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA"
RFC8489_B1_NONCE_COOKIE = "obMatJos2AAAC"
RFC8489_B1_SECURITY_FEATURES = bytes.fromhex("000002")
RFC8489_B1_TRANSACTION_ID = bytes.fromhex("78ad3433c6ad72c029da412e")

# PASSWORD-ALGORITHM carried by the corrected message: SHA-256, no parameters.
RFC8489_PASSWORD_ALGORITHM_MD5 = 0x0001
RFC8489_PASSWORD_ALGORITHM_SHA256 = 0x0002
RFC8489_B1_PASSWORD_ALGORITHM = RFC8489_PASSWORD_ALGORITHM_SHA256
RFC8489_B1_PASSWORD_ALGORITHM_PARAMETERS = b""

# USERHASH = SHA-256(OpaqueString(username) ":" OpaqueString(realm))
# (RFC 8489 section 14.4).
RFC8489_B1_USERHASH = bytes.fromhex(
    "4a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704"
)
# Derived, not printed in the RFC: the SHA-256 long-term key,
# SHA-256(username ":" OpaqueString(realm) ":" OpaqueString(password))
# (RFC 8489 section 18.5.1.2), 32 bytes.
RFC8489_B1_LONG_TERM_KEY = bytes.fromhex(
    "dd295a613b9058c3c23d6dc7165bda072304d989c9d0af3a8c7e184b4f9bb4a1"
)
# HMAC-SHA256 with RFC8489_B1_LONG_TERM_KEY, untruncated (32 bytes).
RFC8489_B1_MESSAGE_INTEGRITY_SHA256 = bytes.fromhex(
    "b5c7bf005b6c52a21c51c5e892f81924136296cb927c43149309278cc6518e65"
)

# The corrected message (erratum 6268). No FINGERPRINT.
RFC8489_B1_SAMPLE_REQUEST = bytes.fromhex(
    "00 01 00 90 "  # Request type and message length
    "21 12 a4 42 "  # Magic cookie
    "78 ad 34 33 "  # }
    "c6 ad 72 c0 "  # }  Transaction ID
    "29 da 41 2e "  # }
    "00 1e 00 20 "  # USERHASH attribute header
    "4a 3c f3 8f "  # }
    "ef 69 92 bd "  # }
    "a9 52 c6 78 "  # }
    "04 17 da 0f "  # }  Userhash value (32 bytes)
    "24 81 94 15 "  # }
    "56 9e 60 b2 "  # }
    "05 c4 6e 41 "  # }
    "40 7f 17 04 "  # }
    "00 15 00 29 "  # NONCE attribute header
    "6f 62 4d 61 "  # }
    "74 4a 6f 73 "  # }
    "32 41 41 41 "  # }
    "43 66 2f 2f "  # }
    "34 39 39 6b "  # }  Nonce value and padding (3 bytes)
    "39 35 34 64 "  # }
    "36 4f 4c 33 "  # }
    "34 6f 4c 39 "  # }
    "46 53 54 76 "  # }
    "79 36 34 73 "  # }
    "41 00 00 00 "  # }
    "00 14 00 0b "  # REALM attribute header
    "65 78 61 6d "  # }
    "70 6c 65 2e "  # }  Realm value (11 bytes) and padding (1 byte)
    "6f 72 67 00 "  # }
    "00 1d 00 04 "  # PASSWORD-ALGORITHM attribute header
    "00 02 00 00 "  # PASSWORD-ALGORITHM value (4 bytes)
    "00 1c 00 20 "  # MESSAGE-INTEGRITY-SHA256 attribute header
    "b5 c7 bf 00 "  # }
    "5b 6c 52 a2 "  # }
    "1c 51 c5 e8 "  # }
    "92 f8 19 24 "  # }  HMAC-SHA256 value
    "13 62 96 cb "  # }
    "92 7c 43 14 "  # }
    "93 09 27 8c "  # }
    "c6 51 8e 65"  # }
)

# The message exactly as printed in RFC 8489 Appendix B.1, before the
# erratum. It is malformed (its length field says 156 bytes of attributes,
# it has 136) and its HMAC does not verify under the rules of section 14.6.
# Kept only as a message a parser or verifier must reject.
RFC8489_B1_SAMPLE_REQUEST_AS_PUBLISHED = bytes.fromhex(
    "00 01 00 9c "  # Request type and message length
    "21 12 a4 42 "  # Magic cookie
    "78 ad 34 33 "  # }
    "c6 ad 72 c0 "  # }  Transaction ID
    "29 da 41 2e "  # }
    "00 1e 00 20 "  # USERHASH attribute header
    "4a 3c f3 8f "  # }
    "ef 69 92 bd "  # }
    "a9 52 c6 78 "  # }
    "04 17 da 0f "  # }  Userhash value (32 bytes)
    "24 81 94 15 "  # }
    "56 9e 60 b2 "  # }
    "05 c4 6e 41 "  # }
    "40 7f 17 04 "  # }
    "00 15 00 29 "  # NONCE attribute header
    "6f 62 4d 61 "  # }
    "74 4a 6f 73 "  # }
    "32 41 41 41 "  # }
    "43 66 2f 2f "  # }
    "34 39 39 6b "  # }  Nonce value and padding (3 bytes)
    "39 35 34 64 "  # }
    "36 4f 4c 33 "  # }
    "34 6f 4c 39 "  # }
    "46 53 54 76 "  # }
    "79 36 34 73 "  # }
    "41 00 00 00 "  # }
    "00 14 00 0b "  # REALM attribute header
    "65 78 61 6d "  # }
    "70 6c 65 2e "  # }  Realm value (11 bytes) and padding (1 byte)
    "6f 72 67 00 "  # }
    "00 1c 00 20 "  # MESSAGE-INTEGRITY-SHA256 attribute header
    "e4 68 6c 8f "  # }
    "0e de b5 90 "  # }
    "13 e0 70 90 "  # }
    "01 0a 93 ef "  # }  HMAC-SHA256 value
    "cc bc cc 54 "  # }
    "4c 0a 45 d9 "  # }
    "f8 30 aa 6d "  # }
    "6f 73 5a 01"  # }
)
