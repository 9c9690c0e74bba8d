// What every call sends besides its message (clients/README.md, "Metadata").
//
// The model pair the call is for, so that a load balancer can send it to a replica that already holds the pair:
// "<model>+<refiner model>" as given in the request ("" for the server's default), with every byte outside
// [A-Za-z0-9:@+/._~-] percent-encoded. An upload sends the pair of the request that will use the image, so that
// it lands on the same replica. The token, if the server asks for one, goes along.
export function headers(pair: { model: string; refiner?: { model: string } }): Record<string, string> {
  const value = `${pair.model}+${pair.refiner?.model ?? ""}`;
  const encoded = Array.from(new TextEncoder().encode(value), (byte) => {
    const c = String.fromCharCode(byte);
    return /[A-Za-z0-9:@+\/._~-]/.test(c) ? c : `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }).join("");
  const token = process.env.REFINERY_TOKEN;
  // Tracing: with W3C trace context in the call, the server's spans join the caller's trace. An OpenTelemetry
  // caller writes it with `propagation.inject(context.active(), headers)` from @opentelemetry/api; here a
  // traceparent from the environment (TRACEPARENT="00-<32 hex trace id>-<16 hex span id>-01") stands in for it.
  const traceparent = process.env.TRACEPARENT;
  return {
    "refinery-pair": encoded,
    ...(token ? { authorization: `Bearer ${token}` } : {}),
    ...(traceparent ? { traceparent } : {}),
  };
}
