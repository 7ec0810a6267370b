//! Validation of one request against the negotiated export (pure).
//!
//! Choices, from the NBD protocol document:
//! - unknown command, unknown or misplaced flag, command not advertised -> EINVAL;
//! - write/trim/zero on a read-only export -> EPERM;
//! - past the end of the export: ENOSPC for WRITE and WRITE_ZEROES ("a write request
//!   including sectors beyond the size of the device"), EINVAL otherwise.
//!
//! - BLOCK_STATUS only once a metadata context was negotiated (`with_block_status`),
//!   with length non-zero, only the REQ_ONE flag, and inside the export -> else EINVAL.
//!
//! There is no alignment rule (the minimum block size is 1) and no length limit but
//! the export's end: requests longer than the advertised maximum payload are served in
//! parts, as nbd-server serves them.

use super::allowed_flags;
use crate::nbd_wire::{
    cmd_name, RequestHeader, CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, ERR_EINVAL, ERR_ENOSPC, ERR_EPERM, FLAG_REQ_ONE, TFLAG_READ_ONLY, TFLAG_SEND_CACHE,
    TFLAG_SEND_FLUSH, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};

/// An error reply: the NBD error and the message that says why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub error: u32,
    pub message: String,
}

impl Refusal {
    fn new(error: u32, message: String) -> Self {
        Self { error, message }
    }
}

#[derive(Debug)]
struct Rule {
    name: &'static str,
    allowed: u16,
    refusal: Option<Refusal>,
}

/// The checks for one negotiated export, with the per-command rules precomputed.
#[derive(Debug)]
pub struct Checker {
    size: u64,
    rules: Vec<Option<Rule>>, // indexed by command number
}

const SERVED: [u16; 6] = [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES];

impl Checker {
    pub fn new(size: u64, tflags: u16, structured: bool) -> Self {
        let mut rules: Vec<Option<Rule>> = (0..=CMD_BLOCK_STATUS).map(|_| None).collect();
        for command in SERVED {
            let name = cmd_name(command).expect("a served command has a name");
            let needs = match command {
                CMD_FLUSH => TFLAG_SEND_FLUSH,
                CMD_TRIM => TFLAG_SEND_TRIM,
                CMD_WRITE_ZEROES => TFLAG_SEND_WRITE_ZEROES,
                CMD_CACHE => TFLAG_SEND_CACHE,
                _ => 0,
            };
            let writes = matches!(command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
            let refusal = if needs != 0 && tflags & needs == 0 {
                Some(Refusal::new(
                    ERR_EINVAL,
                    format!("{name} is not supported by this export"),
                ))
            } else if writes && tflags & TFLAG_READ_ONLY != 0 {
                Some(Refusal::new(ERR_EPERM, format!("{name} on a read-only export")))
            } else {
                None
            };
            let allowed = allowed_flags(command, tflags, structured);
            rules[command as usize] = Some(Rule { name, allowed, refusal });
        }
        Self { size, rules }
    }

    /// Also serve BLOCK_STATUS: the client negotiated a metadata context (base:allocation).
    pub fn with_block_status(mut self) -> Self {
        self.rules[CMD_BLOCK_STATUS as usize] = Some(Rule {
            name: "BLOCK_STATUS",
            allowed: FLAG_REQ_ONE,
            refusal: None,
        });
        self
    }

    /// The error reply for `head`, or None if it may go to the backend. DISC is never refused.
    pub fn check(&self, head: &RequestHeader) -> Option<Refusal> {
        let command = head.typ;
        if command == CMD_DISC {
            return None;
        }
        let Some(Some(rule)) = self.rules.get(command as usize) else {
            let message = if command == CMD_BLOCK_STATUS {
                "BLOCK_STATUS needs a metadata context; none was negotiated".to_string()
            } else {
                format!("unknown command {command}")
            };
            return Some(Refusal::new(ERR_EINVAL, message));
        };
        let bad = head.flags & !rule.allowed;
        if bad != 0 {
            let message = format!("command flags {bad:#x} are not valid for {} here", rule.name);
            return Some(Refusal::new(ERR_EINVAL, message));
        }
        if rule.refusal.is_some() {
            return rule.refusal.clone();
        }
        if command == CMD_FLUSH {
            if head.offset != 0 || head.length != 0 {
                return Some(Refusal::new(ERR_EINVAL, "FLUSH must have offset and length 0".into()));
            }
            return None;
        }
        if command == CMD_BLOCK_STATUS && head.length == 0 {
            return Some(Refusal::new(
                ERR_EINVAL,
                "BLOCK_STATUS of length 0: ask for at least one byte".into(),
            ));
        }
        // u128: a hostile offset near 2^64 plus a length must not wrap around.
        let end = u128::from(head.offset) + u128::from(head.length);
        if end > u128::from(self.size) {
            let error = if matches!(command, CMD_WRITE | CMD_WRITE_ZEROES) {
                ERR_ENOSPC
            } else {
                ERR_EINVAL
            };
            let message = format!(
                "{} [{}, {end}) is beyond the export size {}",
                rule.name, head.offset, self.size
            );
            return Some(Refusal::new(error, message));
        }
        None
    }
}
