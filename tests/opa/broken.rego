# Two values for one complete rule when the method is GET: OPA fails the evaluation
# ("complete rules must not produce multiple outputs") and answers HTTP 500.
package broken

import rego.v1

allow := true if input.method == "GET"

allow := false if startswith(input.path, "/v1/")
