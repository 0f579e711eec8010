variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "us-east-1"
}

variable "prefix" {
  description = "Prefix of every resource name (<prefix>-jobs, <prefix>-artifacts, ...). Lowercase, it also names the bucket."
  type        = string
  default     = "kiln"
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{1,30}$", var.prefix))
    error_message = "prefix must be 2 to 31 of a-z, 0-9 and '-'."
  }
}
