"""GET one URL with a chosen Host header from inside a network namespace and
print {"status": ..., "body": ...} as JSON. Retries refused connections for
up to 30 seconds, so it doubles as a readiness wait.

usage: http_get.py URL HOST
"""

import http.client
import json
import sys
import time
import urllib.parse

url, host = sys.argv[1], sys.argv[2]
parts = urllib.parse.urlsplit(url)
deadline = time.monotonic() + 30
while True:
    try:
        connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=5)
        connection.request("GET", parts.path, headers={"Host": host})
        response = connection.getresponse()
        print(json.dumps({"status": response.status, "body": response.read().decode("utf-8", "replace")}))
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
