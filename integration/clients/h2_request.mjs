// One HTTP/2 request (cleartext, prior knowledge) to the IMDS endpoint with a
// body in DATA frames and trailers, printed as {"status": ..., "body": ...}:
// what the harness's HTTP/1.1 client cannot send.
//
// env: AWS_EC2_METADATA_SERVICE_ENDPOINT (the listener), H2_AUTHORITY,
// H2_METHOD, H2_PATH, H2_BODY
import http2 from "node:http2";

const env = process.env;
const session = http2.connect(env.AWS_EC2_METADATA_SERVICE_ENDPOINT);
session.on("error", (e) => {
  console.error(e);
  process.exit(1);
});
const request = session.request(
  { ":method": env.H2_METHOD, ":path": env.H2_PATH, ":authority": env.H2_AUTHORITY },
  // node ends a GET with its headers unless told otherwise.
  { waitForTrailers: true, endStream: false },
);
request.on("wantTrailers", () => request.sendTrailers({ "x-trailer": "held" }));
let status = 0;
const chunks = [];
request.on("response", (headers) => (status = headers[":status"]));
request.on("data", (chunk) => chunks.push(chunk));
request.on("end", () => {
  console.log(JSON.stringify({ status, body: Buffer.concat(chunks).toString("utf8") }));
  session.close();
});
request.end(env.H2_BODY);
