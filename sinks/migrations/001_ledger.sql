-- The PostgreSQL projection of ledger.entries, tree heads, receipts and anchors.
-- Applied by sinks/schema.py with search_path set to the target schema (default `ledger`), so
-- names here are unqualified. Amounts are NUMERIC (exact), never float; hashes are lowercase hex.

CREATE TABLE entries (
    entry_id          text PRIMARY KEY,
    command_id        text NOT NULL,
    account_id        text NOT NULL,
    currency          text NOT NULL,
    entry_type        text NOT NULL,
    amount            numeric NOT NULL CHECK (amount > 0),
    running_balance   numeric NOT NULL,
    sequence          bigint NOT NULL CHECK (sequence >= 1),
    batch_id          text,
    batch_size        integer,
    leg_index         integer,
    reverses_entry_id text,
    reference         text,
    metadata          jsonb NOT NULL DEFAULT '{}',
    occurred_at       timestamptz,
    committed_at      timestamptz NOT NULL,
    partition         integer NOT NULL,
    leaf_index        bigint NOT NULL,
    entry_hash        text NOT NULL CHECK (entry_hash ~ '^[0-9a-f]{64}$'),
    merkle_root       text NOT NULL CHECK (merkle_root ~ '^[0-9a-f]{64}$'),
    chain             text,
    chain_tx_hash     text,
    chain_log_index   bigint,
    sunk_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, currency, sequence),
    UNIQUE (partition, leaf_index)
);
-- Point-in-time balances and history: the latest entry of an account at or before a time.
CREATE INDEX entries_account_time ON entries (account_id, currency, committed_at, sequence);
CREATE INDEX entries_batch ON entries (batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE batches (
    batch_id        text PRIMARY KEY,
    batch_size      integer,
    partition       integer NOT NULL,
    committed_at    timestamptz NOT NULL
);

CREATE TABLE tree_heads (
    partition     integer NOT NULL,
    tree_size     bigint NOT NULL CHECK (tree_size >= 0),
    root_hash     text NOT NULL CHECK (root_hash ~ '^[0-9a-f]{64}$'),
    published_at  timestamptz NOT NULL,
    PRIMARY KEY (partition, tree_size)
);

CREATE TABLE receipts (
    entry_id         text PRIMARY KEY,
    immudb_tx        bigint NOT NULL,
    immudb_database  text NOT NULL,
    verified         boolean NOT NULL,
    receipted_at     timestamptz NOT NULL
);
CREATE INDEX receipts_tx ON receipts (immudb_tx);

CREATE TABLE anchors (
    partition         integer NOT NULL,
    tree_size         bigint NOT NULL,
    root_hash         text NOT NULL,
    chain             text NOT NULL,
    tx_hash           text NOT NULL,
    block_number      bigint,
    contract_address  text,
    anchored_at       timestamptz NOT NULL,
    PRIMARY KEY (chain, tx_hash, partition, tree_size)
);

-- Where each source topic partition is consumed up to, committed with the rows it produced.
CREATE TABLE sink_offsets (
    topic        text NOT NULL,
    partition    integer NOT NULL,
    next_offset  bigint NOT NULL CHECK (next_offset >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- Append-only: the projection of an immutable log is never edited in place.
CREATE FUNCTION reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger table %.% is append-only: % rejected', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION reject_change();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION reject_change();
CREATE TRIGGER tree_heads_append_only BEFORE UPDATE OR DELETE ON tree_heads
    FOR EACH ROW EXECUTE FUNCTION reject_change();
CREATE TRIGGER tree_heads_no_truncate BEFORE TRUNCATE ON tree_heads
    FOR EACH STATEMENT EXECUTE FUNCTION reject_change();
CREATE TRIGGER receipts_append_only BEFORE UPDATE OR DELETE ON receipts
    FOR EACH ROW EXECUTE FUNCTION reject_change();
CREATE TRIGGER receipts_no_truncate BEFORE TRUNCATE ON receipts
    FOR EACH STATEMENT EXECUTE FUNCTION reject_change();

-- Posted balance of an account right after its last entry committed at or before `at`
-- (0 before its first entry). Per account, committed_at never goes back, so the latest such
-- entry is the one with the highest sequence. BEGIN ATOMIC binds the table at creation, so the
-- function keeps working when `replay` renames schemas.
CREATE FUNCTION balance_at(p_account_id text, p_currency text, p_at timestamptz)
RETURNS numeric LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce((SELECT e.running_balance FROM entries e
                     WHERE e.account_id = p_account_id AND e.currency = p_currency
                       AND e.committed_at <= p_at
                     ORDER BY e.sequence DESC LIMIT 1), 0);
END;
