"""Pure AT Protocol code: syntax, DID documents, XRPC pages, and (for verified mode) CAR, DAG-CBOR, keys,
commits and the Merkle Search Tree. Nothing here does I/O or imports trio."""
