// What an unmodified Java app in the pod does with the AWS SDK for Java v2:
// InstanceProfileCredentialsProvider (an IMDSv2 token first, IMDSv1 only if
// that fails) resolves credentials from the pod's metadata address, and an
// STS GetCallerIdentity signed with them says whose they are. Prints JSON on
// stdout. Test tooling for integration/tests/sdk_java.rs, not part of the
// product.
//
// Configured only by the environment, as an app would be:
// AWS_EC2_METADATA_SERVICE_ENDPOINT (the pod's metadata address; here the
// sidecar's listener), AWS_ENDPOINT_URL_STS (here the harness's STS) and
// AWS_REGION.
package imdsmesh;

import java.util.LinkedHashMap;
import java.util.Map;
import software.amazon.awssdk.auth.credentials.AwsCredentials;
import software.amazon.awssdk.auth.credentials.AwsSessionCredentials;
import software.amazon.awssdk.auth.credentials.InstanceProfileCredentialsProvider;
import software.amazon.awssdk.http.urlconnection.UrlConnectionHttpClient;
import software.amazon.awssdk.services.sts.StsClient;
import software.amazon.awssdk.services.sts.model.GetCallerIdentityResponse;

public final class SdkJava {
    private SdkJava() {}

    public static void main(String[] args) {
        try (InstanceProfileCredentialsProvider provider = InstanceProfileCredentialsProvider.create();
                StsClient sts = StsClient.builder()
                        .credentialsProvider(provider)
                        .httpClient(UrlConnectionHttpClient.create())
                        .build()) {
            AwsCredentials credentials = provider.resolveCredentials();
            GetCallerIdentityResponse identity = sts.getCallerIdentity();
            Map<String, String> report = new LinkedHashMap<>();
            report.put("accessKeyId", credentials.accessKeyId());
            report.put("secretAccessKey", credentials.secretAccessKey());
            report.put("sessionToken",
                    credentials instanceof AwsSessionCredentials session ? session.sessionToken() : "");
            report.put("expiration", credentials.expirationTime().map(Object::toString).orElse(""));
            report.put("arn", identity.arn());
            report.put("account", identity.account());
            report.put("userId", identity.userId());
            System.out.println(json(report));
        }
    }

    /** A flat JSON object of strings (the SDK's own JSON code is internal). */
    private static String json(Map<String, String> fields) {
        StringBuilder out = new StringBuilder("{");
        fields.forEach((name, value) -> {
            if (out.length() > 1) {
                out.append(',');
            }
            out.append(quote(name)).append(':').append(quote(value));
        });
        return out.append('}').toString();
    }

    private static String quote(String text) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : text.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }
}
