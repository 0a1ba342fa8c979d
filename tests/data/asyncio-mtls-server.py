#!/usr/bin/env python3
"""A TLS server that requires a client certificate, served by Python's asyncio (OpenSSL
underneath), for tests/openssl.rs.

Usage: asyncio-mtls-server.py CERT.pem KEY.pem CLIENT-CA.pem, with the listening socket as
standard input (the test binds it). It answers every request with Immich's {"res":"pong"}.

Without an acceptable certificate OpenSSL fails the server's side of the TLS 1.3 handshake
after the client has finished its own, and asyncio drops the connection without delivering
the alert: the client sees only a reset or an early end of stream.
"""
import asyncio
import socket
import ssl
import sys

context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
context.verify_mode = ssl.CERT_REQUIRED
context.load_verify_locations(cafile=sys.argv[3])


async def answer(reader, writer):
    try:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"res":"pong"}'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
    finally:
        writer.close()


async def main():
    listener = socket.socket(fileno=sys.stdin.fileno())
    server = await asyncio.start_server(answer, sock=listener, ssl=context)
    async with server:
        await server.serve_forever()


asyncio.run(main())
