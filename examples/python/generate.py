"""Stream a generation from a Shard coordinator with the Python client (the base install:
`pip install shard`, no torch).

    python examples/python/generate.py --coordinator localhost:50051 --certs certs \
        --prompt "Once upon a time" --max-tokens 32

--certs holds ca.pem and client.pem/client.key (`shard certs local` writes them), or a
Kubernetes TLS Secret's ca.crt, tls.crt and tls.key."""

import argparse
import sys

from shard.client import Client, ClientError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", default="localhost:50051")
    parser.add_argument("--certs", required=True)
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with Client(args.coordinator, credentials=args.certs, timeout=300) as client:
        try:
            stream = client.stream(args.prompt, max_tokens=args.max_tokens)
            for delta in stream:
                print(delta.text, end="", flush=True)
        except ClientError as error:
            print(f"\n{error}", file=sys.stderr)  # e.g. "INVALID_ARGUMENT: the prompt is empty"
            return 1
    summary = stream.summary
    print(f"\n[{summary.tokens} tokens, {summary.tokens_per_second:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
