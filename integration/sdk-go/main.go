// sdk-go is what an unmodified Go app in the pod does with the AWS SDK for Go
// v2: config.LoadDefaultConfig finds no keys in the environment or config
// files, so its default chain reaches the EC2 role provider (ec2rolecreds over
// feature/ec2/imds, which asks for an IMDSv2 token first and falls back to
// IMDSv1 only if that fails), and an STS GetCallerIdentity signed with those
// credentials says whose they are. It prints JSON on stdout. It is test
// tooling for the Rust harness (integration/tests/sdk_go.rs), not part of the
// product.
//
// Configured only by the environment, as an app would be:
// AWS_EC2_METADATA_SERVICE_ENDPOINT (the pod's metadata address; here the
// sidecar's listener), AWS_ENDPOINT_URL_STS (here the harness's STS) and
// AWS_REGION.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/sts"
)

// What the app saw, named as the SDK names it.
type report struct {
	Source          string `json:"source"`
	AccessKeyID     string `json:"accessKeyId"`
	SecretAccessKey string `json:"secretAccessKey"`
	SessionToken    string `json:"sessionToken"`
	CanExpire       bool   `json:"canExpire"`
	Expiration      string `json:"expiration"`
	Arn             string `json:"arn"`
	Account         string `json:"account"`
	UserID          string `json:"userId"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg, err := config.LoadDefaultConfig(ctx)
	if err != nil {
		return fmt.Errorf("load default config: %w", err)
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		return fmt.Errorf("retrieve credentials: %w", err)
	}
	identity, err := sts.NewFromConfig(cfg).GetCallerIdentity(ctx, &sts.GetCallerIdentityInput{})
	if err != nil {
		return fmt.Errorf("sts GetCallerIdentity: %w", err)
	}
	return json.NewEncoder(os.Stdout).Encode(report{
		Source:          creds.Source,
		AccessKeyID:     creds.AccessKeyID,
		SecretAccessKey: creds.SecretAccessKey,
		SessionToken:    creds.SessionToken,
		CanExpire:       creds.CanExpire,
		Expiration:      creds.Expires.UTC().Format(time.RFC3339Nano),
		Arn:             aws.ToString(identity.Arn),
		Account:         aws.ToString(identity.Account),
		UserID:          aws.ToString(identity.UserId),
	})
}
