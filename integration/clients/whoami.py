"""What an unmodified app in the pod sees: boto3's default provider chain
finds the instance metadata service (the sidecar), and STS says who those
credentials belong to. Prints JSON on stdout.

Configured only by the environment, as an app would be:
AWS_EC2_METADATA_SERVICE_ENDPOINT (the pod's metadata address; here the
sidecar's listener), AWS_ENDPOINT_URL_STS (here the local STS) and
AWS_DEFAULT_REGION.
"""

import json
import sys

import boto3

session = boto3.session.Session()
credentials = session.get_credentials()
if credentials is None:
    print("boto3 resolved no credentials", file=sys.stderr)
    sys.exit(1)
identity = session.client("sts").get_caller_identity()
frozen = credentials.get_frozen_credentials()
print(
    json.dumps(
        {
            "method": credentials.method,
            "access_key": frozen.access_key,
            "arn": identity["Arn"],
            "account": identity["Account"],
        }
    )
)
