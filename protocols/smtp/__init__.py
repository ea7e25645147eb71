"""SMTP service: plain SMTP from guests, a durable spool, delivery only over verified TLS
(STARTTLS/implicit TLS with CA, DANE or MTA-STS authentication). See README.md."""
