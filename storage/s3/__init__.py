# S3-compatible object storage (AWS S3, Ceph RGW, SeaweedFS): a sans-I/O SigV4 signer (sigv4.py),
# a bounded HTTP/1.1 exchange over asyncio streams (http.py) and the client on top (client.py).
# No SDK: hashlib, hmac and asyncio only. Used today by the offsite backup (storage/backup_s3.py);
# the hub's blobs are not stored here (yet). Must never log or print a secret key.
from .client import ObjectInfo as ObjectInfo
from .client import PutResult as PutResult
from .client import S3Client as S3Client
from .client import S3Location as S3Location
from .client import S3Settings as S3Settings
from .errors import S3Error as S3Error
from .sigv4 import Credentials as Credentials
