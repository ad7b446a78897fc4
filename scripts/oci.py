#!/usr/bin/env python3
"""Pushes an OCI image layout to a registry, or pulls an image back, with
PyPI `oras` (oras-py). The manifest is pushed byte for byte, so its digest
in the registry is the one `mesh-config oci-image` printed (and the one a
WasmPlugin `sha256` pins).

  oci.py push LAYOUT_DIR HOST/REPO:TAG [--insecure]
  oci.py pull HOST/REPO:TAG OUT_DIR [--insecure]

`pull` writes the manifest and its blobs into OUT_DIR and prints JSON:
{"digest": "sha256:...", "layers": [{"mediaType": ..., "path": ...}, ...]}.
"""

import argparse
import hashlib
import json
import os
import sys

import oras.container
import oras.provider


def registry(args):
    return oras.provider.Registry(hostname=args.ref.split("/", 1)[0], insecure=args.insecure)


def push(args):
    with open(os.path.join(args.layout, "index.json"), "rb") as f:
        index = json.load(f)
    descriptor = index["manifests"][0]
    blobs = os.path.join(args.layout, "blobs", "sha256")
    manifest_path = os.path.join(blobs, descriptor["digest"].split(":", 1)[1])
    with open(manifest_path, "rb") as f:
        manifest_bytes = f.read()
    manifest = json.loads(manifest_bytes)
    client = registry(args)
    container = oras.container.Container(args.ref)
    for blob in [manifest["config"]] + manifest["layers"]:
        path = os.path.join(blobs, blob["digest"].split(":", 1)[1])
        response = client.upload_blob(path, container, blob)
        response.raise_for_status()
    # Byte for byte: oras' upload_manifest would re-serialise the JSON and
    # so change the digest.
    response = client.do_request(
        f"{client.prefix}://{container.manifest_url()}",
        "PUT",
        headers={"Content-Type": manifest["mediaType"]},
        data=manifest_bytes,
    )
    response.raise_for_status()
    print(json.dumps({"digest": response.headers.get("Docker-Content-Digest")}))


def pull(args):
    client = registry(args)
    container = oras.container.Container(args.ref)
    response = client.do_request(
        f"{client.prefix}://{container.manifest_url()}",
        "GET",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    response.raise_for_status()
    manifest_bytes = response.content
    digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    manifest = json.loads(manifest_bytes)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "manifest.json"), "wb") as f:
        f.write(manifest_bytes)
    layers = []
    for layer in manifest["layers"]:
        path = os.path.join(args.out, layer["digest"].split(":", 1)[1])
        client.download_blob(container, layer["digest"], path)
        layers.append({"mediaType": layer["mediaType"], "path": path})
    print(json.dumps({"digest": digest, "registryDigest": response.headers.get("Docker-Content-Digest"), "layers": layers}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push")
    p.add_argument("layout")
    p.add_argument("ref")
    p.add_argument("--insecure", action="store_true", help="plain HTTP")
    p.set_defaults(run=push)
    p = sub.add_parser("pull")
    p.add_argument("ref")
    p.add_argument("out")
    p.add_argument("--insecure", action="store_true", help="plain HTTP")
    p.set_defaults(run=pull)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
