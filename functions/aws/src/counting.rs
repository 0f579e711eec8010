//! Counting the HTTP requests the SDK clients send, per service: the benchmark reports AWS
//! calls per job with it.

use aws_sdk_dynamodb::config::{
    ConfigBag, Intercept, RuntimeComponents, interceptors::BeforeTransmitInterceptorContextRef,
};
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

/// Counts every request (retries included) of the clients it is installed on.
#[derive(Debug, Clone, Default)]
pub struct CallCounter {
    count: Arc<AtomicU64>,
    service: &'static str,
}

impl CallCounter {
    pub fn new(service: &'static str) -> Self {
        Self { count: Arc::default(), service }
    }

    pub fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn service(&self) -> &'static str {
        self.service
    }
}

impl Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "CallCounter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_dynamodb::error::BoxError> {
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// One counter per service.
#[derive(Debug, Clone)]
pub struct AwsCallCounters {
    pub dynamodb: CallCounter,
    pub sqs: CallCounter,
    pub s3: CallCounter,
}

impl Default for AwsCallCounters {
    fn default() -> Self {
        Self { dynamodb: CallCounter::new("dynamodb"), sqs: CallCounter::new("sqs"), s3: CallCounter::new("s3") }
    }
}
