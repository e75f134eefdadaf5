"""A ranking must cover exactly its item's completions, each once: a database trigger on
labeling_ranking (PostgreSQL and SQLite) compares the sorted ids in `groups` with the item's
ItemCompletion ids and refuses the row otherwise (an IntegrityError in Django). Plus an index
for "the user's live lease".

The message is the wording of rlhf.rankings.EXACTLY_ONCE, which the services check first
(databases migrated before that wording keep the older message; the rule is the same).

On SQLite, a later migration that makes Django rebuild labeling_ranking (most ALTERs) drops
these triggers with the old table: such a migration must run `create_trigger` again.
"""

from django.conf import settings
from django.db import migrations, models

POSTGRES_CREATE = """
CREATE OR REPLACE FUNCTION labeling_ranking_covers_item() RETURNS trigger AS $$
DECLARE
    got bigint[];
    want bigint[];
BEGIN
    SELECT coalesce(array_agg(x::bigint ORDER BY x::bigint), '{}')
      INTO got
      FROM jsonb_array_elements(NEW.groups) AS g, jsonb_array_elements_text(g) AS x;
    SELECT coalesce(array_agg(completion_id ORDER BY completion_id), '{}')
      INTO want
      FROM labeling_itemcompletion WHERE item_id = NEW.item_id;
    IF got IS DISTINCT FROM want THEN
        RAISE EXCEPTION 'item %: a ranking must rank each completion exactly once', NEW.item_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER labeling_ranking_covers_item
    BEFORE INSERT OR UPDATE OF groups, item_id ON labeling_ranking
    FOR EACH ROW EXECUTE FUNCTION labeling_ranking_covers_item();
"""
POSTGRES_DROP = """
DROP TRIGGER IF EXISTS labeling_ranking_covers_item ON labeling_ranking;
DROP FUNCTION IF EXISTS labeling_ranking_covers_item();
"""

_SQLITE_CHECK = """
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: a ranking must rank each completion exactly once')
    WHERE (
        SELECT group_concat(v, ',') FROM (
            SELECT CAST(e.value AS INTEGER) AS v
            FROM json_each(NEW.groups) AS g, json_each(g.value) AS e ORDER BY v
        )
    ) IS NOT (
        SELECT group_concat(c, ',') FROM (
            SELECT completion_id AS c FROM labeling_itemcompletion
            WHERE item_id = NEW.item_id ORDER BY c
        )
    );
END;
"""
SQLITE_CREATE = [
    "CREATE TRIGGER labeling_ranking_covers_item_insert BEFORE INSERT ON labeling_ranking"
    + _SQLITE_CHECK,
    "CREATE TRIGGER labeling_ranking_covers_item_update BEFORE UPDATE OF groups, item_id "
    "ON labeling_ranking" + _SQLITE_CHECK,
]
SQLITE_DROP = [
    "DROP TRIGGER IF EXISTS labeling_ranking_covers_item_insert",
    "DROP TRIGGER IF EXISTS labeling_ranking_covers_item_update",
]


def create_trigger(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(POSTGRES_CREATE, params=None)
    elif vendor == "sqlite":
        for sql in SQLITE_CREATE:
            schema_editor.execute(sql, params=None)


def drop_trigger(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(POSTGRES_DROP, params=None)
    elif vendor == "sqlite":
        for sql in SQLITE_DROP:
            schema_editor.execute(sql, params=None)


class Migration(migrations.Migration):
    dependencies = [
        ("labeling", "0001_initial"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddIndex(
            model_name="assignment",
            index=models.Index(
                fields=["user", "status", "expires_at"], name="assignment_user_live_idx"
            ),
        ),
        migrations.RunPython(create_trigger, drop_trigger),
    ]
