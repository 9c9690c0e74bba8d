# frozen_string_literal: true

# What every call sends besides its message (clients/README.md, "Metadata").
module RefineryMetadata
  # The model pair the call is for, so that a load balancer can send it to a replica that already holds the pair:
  # "<model>+<refiner model>" as given in the request ("" for the server's default), with every byte outside
  # [A-Za-z0-9:@+/._~-] percent-encoded. An upload sends the pair of the request that will use the image, so that
  # it lands on the same replica. The token, if the server asks for one, goes along.
  def self.for(request)
    pair = "#{request.model}+#{request.refiner&.model}".b.gsub(%r{[^A-Za-z0-9:@+/._~-]}) { |c| format("%%%02X", c.ord) }
    token = ENV.fetch("REFINERY_TOKEN", "")
    headers = token.empty? ? { "refinery-pair" => pair } : { "refinery-pair" => pair, "authorization" => "Bearer #{token}" }
    # Tracing: with W3C trace context in the call, the server's spans join the caller's trace. An OpenTelemetry
    # caller writes it with `OpenTelemetry.propagation.inject(headers)`; here a traceparent from the environment
    # (TRACEPARENT="00-<32 hex trace id>-<16 hex span id>-01") stands in for it.
    traceparent = ENV.fetch("TRACEPARENT", "")
    traceparent.empty? ? headers : headers.merge("traceparent" => traceparent)
  end
end
