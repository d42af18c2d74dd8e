"""TLS interception material: our own CA and the leaf certificates it mints per server name.

The proxy terminates the agent's TLS with a certificate for the name the agent asked for (SNI, or
the original destination IP when there is none), signed by a CA that the agent's trust store was
given through the bundle file. Everything here is synchronous and free of sockets.

API (proxy.tls.ca):
    CertificateAuthority.create(common_name=..., key_type="ec"|"rsa") -> a new CA in memory
    CertificateAuthority.load(cert_path, key_path) / .save(cert_path, key_path)
    CertificateAuthority.load_or_create(directory) -> reads or writes ca.pem + ca.key (0600)
    LeafMinter(ca, validity=..., cache_size=...).leaf(host) -> Leaf (cert/key/chain PEM), LRU-cached
    LeafMinter.server_context(host) -> ssl.SSLContext ready for an sni_callback, also cached
    write_bundle(ca, dest, system_bundle=...) -> system CAs + ours, for the agent's trust store

SNI/ALPN parsing of the ClientHello belongs to classifier/, not here.
"""
