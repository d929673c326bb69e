# The index on PostgreSQL (issue 27), first slice: the schema as numbered migrations
# (migrations/NNNN_name.sql, applied by schema.migrate_schema) and the copy of a hub's SQLite index
# into an empty PostgreSQL database with its check (from_sqlite.migrate: `mailhub storage migrate`),
# and PgConnection (connection.py), on which the synchronous storage functions run as on SQLite
# (storage/sql.py); the hub serves from it with storage.index (storage/index.py). Needs psycopg 3
# (the optional extra `postgresql`): importing this package imports it, so nothing outside the code
# that uses a PostgreSQL index imports it.
from ..index_url import redacted as redacted
from .connection import PgConnection as PgConnection
from .from_sqlite import MigrateError as MigrateError
from .from_sqlite import MigrateReport as MigrateReport
from .from_sqlite import TargetNotEmpty as TargetNotEmpty
from .from_sqlite import migrate as migrate
from .schema import SchemaTooNew as SchemaTooNew
from .schema import latest_version as latest_version
from .schema import migrate_schema as migrate_schema
from .schema import schema_version as schema_version
