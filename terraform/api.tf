# The HTTP API: one route per route of an http-triggered function in functions.json, each
# integrated with its function (payload format 2.0, what lambda_http decodes), access logs as
# JSON lines, default throttling on every route. Authentication is the functions' own (bearer
# API keys checked against the tenants table), so the routes carry no authorizer.

resource "aws_apigatewayv2_api" "http" {
  name          = "${var.prefix}-api"
  description   = "kiln: jobs and models"
  protocol_type = "HTTP"
}

resource "aws_apigatewayv2_integration" "function" {
  for_each               = toset(values(local.http_routes))
  api_id                 = aws_apigatewayv2_api.http.id
  integration_type       = "AWS_PROXY"
  integration_uri        = aws_lambda_function.function[each.key].invoke_arn
  payload_format_version = "2.0"
  timeout_milliseconds   = min(30000, local.functions[each.key].timeout_s * 1000)
}

resource "aws_apigatewayv2_route" "route" {
  #checkov:skip=CKV_AWS_309:Every route authenticates in the function (kiln-app Authenticator: API key hashes in the tenants table, 401 otherwise); an authorizer would look the key up twice.
  for_each  = local.http_routes
  api_id    = aws_apigatewayv2_api.http.id
  route_key = each.key
  target    = "integrations/${aws_apigatewayv2_integration.function[each.value].id}"
}

resource "aws_cloudwatch_log_group" "api_access" {
  #checkov:skip=CKV_AWS_158:Logs are encrypted by CloudWatch's own key; access logs hold no bodies or keys.
  #checkov:skip=CKV_AWS_338:Retention is a variable (log_retention_days, 30 days by default); a year is a compliance choice, not a default.
  name              = "/aws/apigateway/${var.prefix}-api"
  retention_in_days = var.log_retention_days
}

resource "aws_apigatewayv2_stage" "default" {
  api_id      = aws_apigatewayv2_api.http.id
  name        = "$default"
  auto_deploy = true

  default_route_settings {
    throttling_rate_limit    = var.api_throttle_rate_limit
    throttling_burst_limit   = var.api_throttle_burst_limit
    detailed_metrics_enabled = true
  }

  access_log_settings {
    destination_arn = aws_cloudwatch_log_group.api_access.arn
    format = jsonencode({
      requestId          = "$context.requestId"
      sourceIp           = "$context.identity.sourceIp"
      requestTime        = "$context.requestTime"
      method             = "$context.httpMethod"
      routeKey           = "$context.routeKey"
      path               = "$context.path"
      status             = "$context.status"
      protocol           = "$context.protocol"
      responseLength     = "$context.responseLength"
      responseLatency    = "$context.responseLatency"
      integrationLatency = "$context.integrationLatency"
      integrationError   = "$context.integrationErrorMessage"
    })
  }
}

resource "aws_lambda_permission" "api" {
  for_each      = toset(values(local.http_routes))
  statement_id  = "api"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.function[each.key].function_name
  principal     = "apigateway.amazonaws.com"
  source_arn    = "${aws_apigatewayv2_api.http.execution_arn}/*/*"
}
