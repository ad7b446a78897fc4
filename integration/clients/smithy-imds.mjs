// Resolves credentials once with the AWS SDK for JavaScript's IMDS provider
// (@smithy/credential-provider-imds, what aws-sdk-js v3's default chain uses
// on EC2) and prints them as JSON on stdout. Failures go to stderr with a
// non-zero exit.
//
// The endpoint comes from AWS_EC2_METADATA_SERVICE_ENDPOINT, read by the
// package itself (as every AWS SDK does), so the test sets it to the Envoy
// under test. AWS_EC2_METADATA_V1_DISABLED=true, also read by the package,
// makes it fail rather than fall back to IMDSv1.
import { fromInstanceMetadata } from "@smithy/credential-provider-imds";

if (!process.env.AWS_EC2_METADATA_SERVICE_ENDPOINT) {
  console.error("set AWS_EC2_METADATA_SERVICE_ENDPOINT to the IMDS endpoint (http://127.0.0.1:<port>)");
  process.exit(2);
}

try {
  const provide = fromInstanceMetadata({ timeout: 1000, maxRetries: 0 });
  const credentials = await provide();
  console.log(
    JSON.stringify({
      accessKeyId: credentials.accessKeyId,
      secretAccessKey: credentials.secretAccessKey,
      sessionToken: credentials.sessionToken,
      expiration: credentials.expiration?.toISOString(),
    }),
  );
} catch (error) {
  // The error's own fields (statusCode, name), not the request: no secrets.
  console.error(`smithy-imds: ${error?.name ?? "Error"}: ${error?.message ?? error}` +
    (error?.statusCode ? ` (status ${error.statusCode})` : ""));
  process.exit(1);
}
