#!/usr/bin/env bash
# Builds integration/sdk-java (an app using the AWS SDK for Java v2's
# instance profile provider, the SDK's BOM pinned in its pom.xml; test
# tooling) into the target directory: sdk-java/sdk-java.jar, its
# dependencies in sdk-java/lib. Maven's local repository and build directory
# live under the target dir too, so CI caches everything in one place;
# nothing is rebuilt while the jar is newer than every file of the project.
set -euo pipefail
target=${1:?usage: build-sdk-java.sh TARGET_DIR}
cd "$(dirname "$0")/../integration/sdk-java"
out="$target/imds-mesh/sdk-java"
if [[ -s "$out/sdk-java.jar" && -z "$(find . -newer "$out/sdk-java.jar" -print -quit)" ]]; then
    exit 0
fi
# The jar's manifest names every file in lib/: start from an empty one so a
# dependency dropped from the pom does not linger.
rm -rf "$out"
mvn -B -q -Dmaven.repo.local="$target/maven" -Dsdk.build.dir="$target/sdk-java-build" -Dsdk.out.dir="$out" \
    -Dmaven.test.skip=true package
