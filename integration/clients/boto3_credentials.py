"""Resolves credentials with botocore's default provider chain (what boto3
and the AWS CLI use) and prints them as JSON on stdout.

The chain finds nothing in the environment or config files (the test clears
them), so it reaches the instance metadata provider, which reads
AWS_EC2_METADATA_SERVICE_ENDPOINT and, if set, AWS_EC2_METADATA_V1_DISABLED.
"""

import json
import sys

import boto3

session = boto3.session.Session()
credentials = session.get_credentials()
if credentials is None:
    print("boto3 resolved no credentials", file=sys.stderr)
    sys.exit(1)
frozen = credentials.get_frozen_credentials()
print(
    json.dumps(
        {
            "method": credentials.method,
            "access_key": frozen.access_key,
            "secret_key": frozen.secret_key,
            "token": frozen.token,
        }
    )
)
